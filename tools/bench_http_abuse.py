"""What a hostile neighbour costs `serve --http`: oversized request bodies and a flood of idle connections.

    python tools/bench_http_abuse.py bodies                 # 1 GiB upload: once, then four in parallel
    python tools/bench_http_abuse.py flood --nofile 1024    # limit+100 idle connections for 10 s
    python tools/bench_http_abuse.py bodies --repo /work/main   # the same against another checkout

Starts `klein-agent serve --model tiny --http` from `--repo` (its klein_agent first on PYTHONPATH) on a scratch
store, waits for the model, and then:

- bodies: streams a 1 GiB body (from a generator: the client holds no memory) to POST /mcp with the bearer token,
  with Content-Length and then chunked, once and four in parallel, and a 1 GiB body to GET /gallery/; per case the
  status and how far the server's peak RSS (VmHWM, reset through /proc/PID/clear_refs) rose above its RSS before.
- flood: under RLIMIT_NOFILE `--nofile` (set for the server only), opens nofile+100 idle loopback connections,
  then times a real MCP call (the official SDK client, `server_status`) until it succeeds, keeps the flood for
  `--seconds`, and reports the bytes and lines the server logged meanwhile.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
CHUNK = b"x" * 2**20
SERVE = ["--no-default-dirs", "--http", "--port", "0"]


def start(repo: Path, scratch: Path, nofile: int | None) -> tuple[subprocess.Popen[bytes], int, str, Path]:
    """The server process, its port, its token and its log file, once the model is ready."""
    log_path = scratch / "server.log"
    store = scratch / "store"

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "klein_agent", "serve", "--model", "tiny", "--store", str(store), *SERVE],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
    deadline = time.monotonic() + 120
    port = None
    while True:
        text = log_path.read_text(errors="replace")
        if port is None and (m := re.search(r"streamable HTTP at http://127\.0\.0\.1:(\d+)/mcp", text)):
            port = int(m.group(1))
        if port is not None and "model ready" in text:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{text}")
        time.sleep(0.1)
    token = (scratch / "store.http-token").read_text().strip()
    return proc, port, token, log_path


def status_kib(pid: int, field: str) -> int:
    """A size from /proc/PID/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its RSS now, and return that, in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_kib(pid, "VmRSS")


def upload(port: int, head: str, size: int, chunked: bool) -> str:
    """Send `head` and a body of `size` bytes as fast as the server takes it; the status line it answers (or how
    the connection ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
        sock.sendall(f"{head}{framing}\r\n\r\n".encode())
        sent = 0
        try:
            while sent < size:
                piece = CHUNK[: min(len(CHUNK), size - sent)]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before the body ended
        try:
            answer = sock.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
        except OSError as exc:
            answer = f"({exc.__class__.__name__})"
        return f"{answer or '(closed)'} after {sent / 2**20:.0f} MiB sent"


def bodies(args: argparse.Namespace, scratch: Path) -> None:
    proc, port, token, _ = start(args.repo, scratch, None)
    try:
        mcp = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        )
        gallery = f"GET /gallery/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        cases = [
            ("POST /mcp, 1 GiB, Content-Length", mcp, False, 1),
            ("POST /mcp, 1 GiB, chunked", mcp, True, 1),
            ("POST /mcp, 1 GiB, Content-Length, 4 in parallel", mcp, False, 4),
            ("GET /gallery/, 1 GiB body", gallery, False, 1),
        ]
        print(f"server {args.repo}, pid {proc.pid}")
        for name, head, chunked, parallel in cases:
            before = reset_peak(proc.pid)
            answers: list[str] = []

            def one(head: str = head, chunked: bool = chunked, answers: list[str] = answers) -> None:
                answers.append(upload(port, head, args.size, chunked))

            threads = [threading.Thread(target=one) for _ in range(parallel)]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            grown = (status_kib(proc.pid, "VmHWM") - before) / 1024
            print(
                f"{name}: {sorted(set(answers))} in {time.monotonic() - started:.1f} s; peak RSS +{grown:.0f} MB"
            )
    finally:
        proc.terminate()
        proc.wait(30)


async def first_call(port: int, token: str, deadline: float) -> float:
    """Seconds until a real MCP client's `server_status` succeeds (retrying until `deadline`)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    started = time.monotonic()
    while time.monotonic() < deadline:
        try:
            async with (
                httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=5) as http,
                Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as client,
            ):
                if not (await client.call_tool("server_status", {})).is_error:
                    return time.monotonic() - started
        except Exception:  # refused, reset, timed out: the flood is winning; try again
            pass
    return float("inf")


def flood(args: argparse.Namespace, scratch: Path) -> None:
    import anyio

    proc, port, token, log_path = start(args.repo, scratch, args.nofile)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (args.nofile * 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    idle: list[socket.socket] = []
    try:
        logged = log_path.stat().st_size
        lines = log_path.read_text(errors="replace").count("\n")
        started = time.monotonic()
        for _ in range(args.nofile + 100):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        opened = time.monotonic() - started
        took = anyio.run(first_call, port, token, started + args.seconds)
        time.sleep(max(0.0, started + args.seconds - time.monotonic()))
        grown = log_path.stat().st_size - logged
        new_lines = log_path.read_text(errors="replace").count("\n") - lines
        print(
            f"server {args.repo}, RLIMIT_NOFILE {args.nofile}, {len(idle)} idle connections in {opened:.1f} s"
        )
        print(
            f"first successful MCP call after {took:.1f} s; log +{grown} bytes, +{new_lines} lines in {args.seconds} s"
        )
        print("last log lines:", *log_path.read_text(errors="replace").splitlines()[-3:], sep="\n  ")
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["bodies", "flood"])
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="the checkout whose server runs (default: this one)"
    )
    parser.add_argument("--size", type=int, default=GIB, help="body size in bytes (default: 1 GiB)")
    parser.add_argument("--nofile", type=int, default=1024, help="the server's RLIMIT_NOFILE (flood)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the flood lasts")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-http-"))
    try:
        (bodies if args.what == "bodies" else flood)(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
