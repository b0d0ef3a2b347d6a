"""Front-ends on one shared store, as a user runs them: `klein-agent serve --http` with the tiny model and
`klein-agent gallery`, each its own process on `--store env:DSN` with the blobs from $KLEIN_AGENT_BLOBS, a real MCP
client, and the gallery's live feed (pushed by LISTEN/NOTIFY) showing the picture the server made within 1 s.

Runs in the contained child pytest of tests/test_store_scaleout.py (real PostgreSQL and SeaweedFS); skipped with
the reason when run outside it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client

from tests import store_servers
from tests.http_helpers import authed, wait_listening
from tests.store_backends import postgres_s3, shared_names

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not store_servers.in_private_network(),
        reason="needs the contained PostgreSQL + S3 servers: tests/test_store_scaleout.py runs this file with them",
    ),
]
REPO = Path(__file__).resolve().parents[1]
TOKEN = "shared-store-test-token-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def shared_env(tmp_path: Path) -> dict[str, str]:
    dsn, url = shared_names(tmp_path / "shared")
    endpoint = os.environ[store_servers.S3_ENDPOINT_ENV]
    return {
        **os.environ,
        **store_servers.s3_environment(endpoint),
        "KLEIN_TEST_DSN": dsn,
        "KLEIN_AGENT_BLOBS": url,
        "KLEIN_AGENT_TOKEN": TOKEN,
        "XDG_DATA_HOME": str(tmp_path / "data"),  # the shared store's local neighbours (thumbnails) go here
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture
def process(tmp_path: Path, shared_env: dict[str, str]) -> Iterator[object]:
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str], ready: str) -> int:
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "klein_agent", *args],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=shared_env,
            )
        started.append(proc)
        deadline = time.monotonic() + 60
        while not (found := re.search(ready, log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port = int(found.group(1))
        wait_listening(port)
        return port

    yield start
    for proc in started:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def follow_events(port: int, heard: list[tuple[float, dict[str, object]]], stop: threading.Event) -> None:
    """Read the gallery's server-sent events, noting when each `change` arrived (Unix time)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/gallery/events", headers={"Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    assert response.status == 200
    event = None
    while not stop.is_set():
        line = response.readline().decode().strip()
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event == "change":
            heard.append((time.time(), json.loads(line.split(":", 1)[1])))
    conn.close()


async def test_a_picture_made_on_one_front_end_shows_in_another_s_gallery_within_a_second(
    tmp_path: Path, process: object, shared_env: dict[str, str]
) -> None:
    start = process
    assert callable(start)
    serve_args = ["serve", "--model", "tiny", "--http", "--port", "0", "--store", "env:KLEIN_TEST_DSN"]
    # serve first: it creates the schema; a gallery refuses a database without a store
    serve_port = start(
        "serve", [*serve_args, "--no-default-dirs"], r"streamable HTTP at http://127\.0\.0\.1:(\d+)/mcp"
    )
    # the gallery is started as server_status tells the person: the shared store's options, no secret in them
    async with Client(authed(serve_port, TOKEN)) as client:
        status = await client.call_tool("server_status", {})
    command = status.structured_content["gallery_command"]
    blobs = shared_env["KLEIN_AGENT_BLOBS"]
    endpoint = shared_env[store_servers.S3_ENDPOINT_ENV]
    expected = (
        f"klein-agent gallery --store env:KLEIN_TEST_DSN --blobs {blobs} --s3-endpoint {endpoint} --open"
    )
    assert command == expected and command in status.content[0].text
    gallery_argv = [w for w in shlex.split(command)[1:] if w != "--open"]
    gallery_port = start("gallery", [*gallery_argv, "--port", "0"], r"at http://127\.0\.0\.1:(\d+)/")
    for name in ("gallery.log", "serve.log"):
        text = (tmp_path / name).read_text()
        assert store_servers.S3_SECRET not in text and TOKEN not in text, f"a secret in {name}"

    heard: list[tuple[float, dict[str, object]]] = []
    stop = threading.Event()
    reader = threading.Thread(target=follow_events, args=(gallery_port, heard, stop), daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while not heard and time.monotonic() < deadline:
        time.sleep(0.05)
    assert heard and heard[0][1] == {"newest": None, "total": 0, "verdicts": 0}, heard

    async with Client(authed(serve_port, TOKEN)) as client:
        made = await client.call_tool(
            "generate", {"prompt": "a shared kite", "width": 64, "height": 64, "seed": 1}
        )
        if made.is_error:  # the server's log says what the store's message sums up
            pytest.fail(f"{made.content}\n--- serve.log ---\n{(tmp_path / 'serve.log').read_text()[-6000:]}")
        image_id = made.structured_content["images"][0]["image_id"]
        deadline = time.monotonic() + 5
        while not any(h[1]["newest"] == image_id for h in heard) and time.monotonic() < deadline:
            await anyio.sleep(0.02)
        # Right after a change was sent the feed waits FEED_WAIT_S (2 s) unless a NOTIFY wakes it: a verdict
        # shown within 1 s of its commit was pushed, not found by the next look.
        judged = await client.call_tool("record_verdict", {"image_id": image_id, "verdict": "pick"})
        assert not judged.is_error, judged
        judged_at = time.time()
        deadline = time.monotonic() + 5
        while not any(h[1]["verdicts"] for h in heard) and time.monotonic() < deadline:
            await anyio.sleep(0.02)

    with postgres_s3(tmp_path / "shared") as store:  # a third front-end: the row and its bytes are shared
        stored = store.get(image_id)
        assert store.read_png(image_id)[:8] == b"\x89PNG\r\n\x1a\n"
        mark = store.verdict_mark()
    stop.set()
    arrived = next((t for t, change in heard if change["newest"] == image_id), None)
    assert arrived is not None, f"the gallery never showed {image_id}: {heard}"
    judged_shown = next((t for t, change in heard if change["verdicts"] == mark), None)
    assert judged_shown is not None, f"the gallery never showed the verdict (mark {mark}): {heard}"
    assert judged_shown - judged_at < 1.0, (
        f"the verdict shown {judged_shown - judged_at:.3f} s after its call"
    )
    assert arrived - stored.created_at < 1.0, f"shown {arrived - stored.created_at:.3f} s after its commit"
