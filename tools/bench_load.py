"""Load and memory of a real `klein-agent serve --http` process (tiny model), through the official MCP client.

    python tools/bench_load.py                 # everything below; figures on stdout
    python tools/bench_load.py --sequential 300 --sessions 5 --per-session 10

Measures the server's resident memory (VmRSS from /proc) at rest, after N sequential generate calls, during and
after hostile large inputs (a compose of four tiny lossless WebPs that decode to 8192x8192 each, once and twice
at the same time), and runs a load test: several HTTP sessions with concurrent calls plus one stdio session at
the same time, checking that every call is answered, none is lost, and each session's calls finish in the order
they were sent. Linux only (/proc). The servers run torch on one thread unless OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


def bomb_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8192, 8192), (40, 90, 200)).save(buf, "WEBP", lossless=True)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


@asynccontextmanager
async def connect(port: int, token: str):  # type: ignore[no-untyped-def]
    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(60, read=600)
        ) as h,
        Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=h)) as client,
    ):
        yield client


async def call(client: Client, tool: str, args: dict[str, Any]) -> Any:
    result = await client.call_tool(tool, args)
    if result.is_error:
        raise RuntimeError(result.content[0].text)
    return result


def start_http(scratch: Path, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], int, str]:
    """`serve --http` on a free port with its own store under `scratch`; returns the process, port and token."""
    store = scratch / name
    log_path = scratch / f"{name}.log"
    serve = [sys.executable, "-m", "klein_agent", "serve", "--model", "tiny", "--store", str(store)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            # the tiny model: CUDA's pixel budget on a CPU too (a 512x512 call holds the busy server)
            [*serve, "--http", "--port", "0", "--no-default-dirs", "--max-megapixels", "4.2", *extra],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    port = None
    while port is None:
        if m := re.search(r"HTTP at http://127\.0\.0\.1:(\d+)/mcp", log_path.read_text()):
            port = int(m.group(1))
        time.sleep(0.05)
    return proc, port, (scratch / f"{name}.http-token").read_text().strip()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


async def busy_case(scratch: Path, bomb: str) -> None:
    """A compose of the hostile inputs sent while the only place is taken (--max-queue 0): refused as busy before
    anything is decoded, so the server's memory does not move."""
    proc, port, token = start_http(scratch, "busy-store", "--max-queue", "0")
    try:
        async with connect(port, token) as client:
            await call(client, "generate", {"prompt": "warm-up", "width": 64, "height": 64})
            start = peak = rss_mb(proc.pid)
            refused = ""
            long_call = {"prompt": "holds the place", "width": 512, "height": 512, "steps": 60}
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, client, "generate", long_call)
                while (await call(client, "server_status", {})).structured_content["queue"][
                    "running"
                ] is False:
                    await anyio.sleep(0.02)
                result = await client.call_tool(
                    "compose", {"images": [bomb] * 4, "prompt": "busy", "width": 64, "height": 64}
                )
                peak = max(peak, rss_mb(proc.pid))
                refused = result.content[0].text if result.is_error else "NOT REFUSED"
            print(
                f"compose of 4 such inputs while busy (--max-queue 0): {refused[:70]!r}; "
                f"RSS {start:.0f} MB -> {peak:.0f} MB during -> {rss_mb(proc.pid):.0f} MB after"
            )
    finally:
        stop(proc)


async def main_async(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="klein-load-"))
    serve = [
        sys.executable,
        "-m",
        "klein_agent",
        "serve",
        "--model",
        "tiny",
        "--store",
        str(scratch / "store"),
    ]
    proc, port, token = start_http(scratch, "store", "--max-queue", "64")
    try:
        size = {"width": 64, "height": 64}
        async with connect(port, token) as client:
            await call(client, "generate", {"prompt": "warm-up", **size})
            print(f"RSS at rest (model loaded, one call made): {rss_mb(proc.pid):.0f} MB")
            before = rss_mb(proc.pid)
            for k in range(args.sequential):
                await call(client, "generate", {"prompt": f"call {k}", "seed": k, **size})
            print(
                f"RSS after {args.sequential} sequential calls: {rss_mb(proc.pid):.0f} MB (from {before:.0f})"
            )

            bomb = bomb_uri()
            print(f"hostile input: a {len(bomb)}-character data URI that decodes to 8192x8192")
            peak = rss_mb(proc.pid)

            async def watch(until: anyio.Event) -> None:
                nonlocal peak
                while not until.is_set():
                    peak = max(peak, rss_mb(proc.pid))
                    await anyio.sleep(0.02)

            for together in (1, 2):
                start, peak = rss_mb(proc.pid), rss_mb(proc.pid)
                watching = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch, watching)
                    async with anyio.create_task_group() as calls:
                        for k in range(together):
                            calls.start_soon(
                                call, client, "compose", {"images": [bomb] * 4, "prompt": f"x{k}", **size}
                            )
                    watching.set()
                await anyio.sleep(0.5)
                print(
                    f"compose of 4 such inputs x{together} at once: RSS {start:.0f} MB -> peak {peak:.0f} MB -> "
                    f"after {rss_mb(proc.pid):.0f} MB"
                )
            images = (await call(client, "server_status", {})).structured_content["store"]["images"]
            print(f"store: {images} images (the hostile input stored once, at about 1 Mpx)")
        await busy_case(scratch, bomb)

        # load: HTTP sessions with concurrent calls, plus one stdio session on another store, all at once
        answered: dict[str, list[int]] = {}

        async def http_session(s: int) -> None:
            async with connect(port, token) as client:
                order: list[int] = []
                async with anyio.create_task_group() as tg:
                    for k in range(args.per_session):

                        async def one(k: int = k) -> None:
                            await call(client, "generate", {"prompt": f"s{s} c{k}", "seed": k, **size})
                            order.append(k)

                        tg.start_soon(one)
                        await anyio.sleep(0.005)
                answered[f"http {s}"] = order

        async def stdio_session() -> None:
            params = StdioServerParameters(
                command=sys.executable, args=[*serve[2:], "--store", str(scratch / "stdio-store")], cwd=REPO
            )
            params.args = [
                "-m",
                "klein_agent",
                "serve",
                "--model",
                "tiny",
                "--store",
                str(scratch / "stdio-store"),
                "--no-default-dirs",
            ]
            async with Client(params) as client:
                order: list[int] = []
                for k in range(args.per_session):
                    await call(client, "generate", {"prompt": f"stdio c{k}", "seed": k, **size})
                    order.append(k)
                answered["stdio"] = order

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for s in range(args.sessions):
                tg.start_soon(http_session, s)
            tg.start_soon(stdio_session)
        took = time.perf_counter() - t0
        total = sum(len(v) for v in answered.values())
        in_order = all(v == sorted(v) for v in answered.values())
        print(
            f"load: {args.sessions} HTTP sessions x {args.per_session} concurrent calls + 1 stdio session: "
            f"{total} of {(args.sessions + 1) * args.per_session} answered, "
            f"{'each session in order' if in_order else 'OUT OF ORDER'}, {took:.1f} s; "
            f"server RSS after: {rss_mb(proc.pid):.0f} MB"
        )
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--per-session", type=int, default=10)
    args = parser.parse_args()
    if not Path("/proc/self/status").exists():
        parser.error("needs Linux (/proc)")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # the servers' torch: one thread unless told (two OpenMP threads on contended cores spin, 10x slower here)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    anyio.run(main_async, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
