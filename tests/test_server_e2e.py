"""`klein-agent serve --model tiny` as a real subprocess: stdio, streamable HTTP, restarts and kill -9."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from PIL import Image

from klein_agent.service.store import ImageStore
from tests.http_helpers import REPO, authed, http_server, post_initialize, serve_args

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TOOLS_SNAPSHOT = Path(__file__).parent / "snapshots" / "server_tools.json"  # the published tools


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def stdio_server(store: Path, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=serve_args(store, *extra), cwd=REPO)


async def png_of(client: Client, image_id: str) -> bytes:
    contents = (await client.read_resource(f"image://{image_id}")).contents
    return base64.b64decode(contents[0].blob)  # type: ignore[union-attr]


async def test_stdio_end_to_end_and_images_survive_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "store"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "start.png").write_bytes(_png(128, 96))
    async with Client(stdio_server(store, "--allow-dir", str(inputs))) as client:
        status = await client.call_tool("server_status", {})
        assert status.structured_content["model"]["state"] == "loading", (
            "initialize is answered before the load"
        )
        assert [t.name for t in (await client.list_tools()).tools][:4] == [
            "generate",
            "edit",
            "compose",
            "inpaint",
        ]
        progress: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(message or "")

        made = await client.call_tool(
            "generate",
            {"prompt": "a red kite", "width": 64, "height": 64, "seed": 1, "num_images": 2},
            progress_callback=on_progress,
        )
        assert (
            not made.is_error
            and "loading model" in progress
            and any(m.endswith("step 4/4") for m in progress)
        )
        ids = [i["image_id"] for i in made.structured_content["images"]]
        edited = await client.call_tool("edit", {"image": str(inputs / "start.png"), "prompt": "blue kite"})
        assert not edited.is_error and edited.structured_content["images"][0]["width"] == 128
        ids.append(edited.structured_content["images"][0]["image_id"])
        before = {i: await png_of(client, i) for i in ids}
        prompts = await client.list_prompts()
        assert {p.name for p in prompts.prompts} == {"iterate_image", "compare_images", "flux3_caption"}

    async with Client(stdio_server(store)) as client:  # a new process on the same store
        listed = await client.call_tool("list_images", {})
        assert set(ids) <= {i["image_id"] for i in listed.structured_content["images"]}
        for image_id, png in before.items():
            assert await png_of(client, image_id) == png
        again = await client.call_tool("edit", {"image": ids[0], "prompt": "a green kite", "seed": 3})
        assert not again.is_error and again.structured_content["images"][0]["parents"] == [ids[0]]


async def test_stdout_carries_only_json_rpc_and_logs_go_to_stderr(tmp_path: Path) -> None:
    """Talk raw JSON-RPC over the pipes: every stdout line must parse; the logs are on stderr."""
    log_path = tmp_path / "stderr.log"
    with (
        open(log_path, "wb") as log,
        subprocess.Popen(
            [sys.executable, *serve_args(tmp_path / "store", "--log-level", "DEBUG")],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,  # a file, not a pipe: DEBUG logs must never block the server
        ) as proc,
    ):
        stdout = _raw_session(proc)
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in stdout.splitlines() if line.strip())
    stderr = log_path.read_text()
    assert "model ready" in stderr and "klein-agent serve" in stderr


def _raw_session(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdin and proc.stdout
    lines: list[bytes] = []

    def send(message: dict[str, Any]) -> None:
        assert proc.stdin
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()

    def answer(request_id: int) -> dict[str, Any]:
        assert proc.stdout
        while True:
            line = proc.stdout.readline()
            assert line, "the server closed stdout"
            lines.append(line)
            message = json.loads(line)
            assert message["jsonrpc"] == "2.0"
            if message.get("id") == request_id:
                return message  # type: ignore[no-any-return]

    try:
        send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"},
                },
            }
        )
        assert answer(1)["result"]["serverInfo"]["name"] == "klein-agent"
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        listed = [tool["name"] for tool in answer(2)["result"]["tools"]]
        assert listed == [tool["name"] for tool in json.loads(TOOLS_SNAPSHOT.read_text())]
        call = {
            "name": "generate",
            "arguments": {"prompt": "x", "width": 64, "height": 64},
            "_meta": {"progressToken": 7},
        }
        send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": call})
        result = answer(3)["result"]
        assert not result.get("isError") and result["content"][0]["type"] == "image"
        image_id = result["structuredContent"]["images"][0]["image_id"]
        send(
            {"jsonrpc": "2.0", "id": 4, "method": "resources/read", "params": {"uri": f"image://{image_id}"}}
        )
        assert answer(4)["result"]["contents"][0]["mimeType"] == "image/png"
        progress = [json.loads(line) for line in lines if b"notifications/progress" in line]
        assert progress and all(p["params"]["progressToken"] == 7 for p in progress)
        proc.stdin.close()
        rest = proc.stdout.read()
        assert proc.wait(timeout=30) == 0
        return b"".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_streamable_http_with_host_and_origin_checks(tmp_path: Path) -> None:
    with http_server(tmp_path, tmp_path / "store") as (_, port, token):
        auth = {"Authorization": f"Bearer {token}"}
        assert post_initialize(port, {"Host": "evil.example", **auth}) == 421
        assert (
            post_initialize(port, {"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example", **auth})
            == 403
        )
        assert (
            post_initialize(port, {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}", **auth})
            == 200
        )
        async with Client(authed(port, token)) as client:
            made = await client.call_tool("generate", {"prompt": "over http", "width": 64, "height": 64})
            assert not made.is_error
            image_id = made.structured_content["images"][0]["image_id"]
            assert Image.open(io.BytesIO(await png_of(client, image_id))).size == (64, 64)
            status = await client.call_tool("server_status", {})
            assert status.structured_content["model"]["state"] == "ready"


async def test_kill_9_while_writing_leaves_a_consistent_store_with_every_acknowledged_image(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    acknowledged: list[str] = []
    with http_server(tmp_path, store) as (proc, port, token):
        async with Client(authed(port, token)) as client:
            await client.call_tool("generate", {"prompt": "warm-up", "width": 64, "height": 64})

        async def writer(k: int) -> None:
            with contextlib.suppress(Exception):  # calls in flight at the kill fail; that is the point
                async with Client(authed(port, token)) as client:
                    for n in range(100):
                        args = {"prompt": f"writer {k} call {n}", "width": 64, "height": 64, "num_images": 2}
                        result = await client.call_tool("generate", args)
                        acknowledged.extend(i["image_id"] for i in result.structured_content["images"])

        async with anyio.create_task_group() as tg:
            for k in range(3):
                tg.start_soon(writer, k)
            with anyio.fail_after(120):
                while len(acknowledged) < 8:
                    await anyio.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(store / "store.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with ImageStore(store) as reopened:  # its open sweeps orphans and temp files
        for image_id in acknowledged:
            with Image.open(io.BytesIO(reopened.read_png(image_id))) as img:
                img.verify()
        page, cursor = reopened.list_images()
        while cursor:  # every image, a page at a time
            more, cursor = reopened.list_images(cursor=cursor)
            page += more
        for image in page:
            Image.open(io.BytesIO(reopened.read_png(image.image_id))).load()
        assert not [p for p in (store / "images").iterdir() if p.name.startswith(".tmp-")]
        assert len(page) >= len(acknowledged) + 1


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()
