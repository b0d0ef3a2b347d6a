"""Two `serve --http` front-ends on one store, as a load balancer sees them (issue 20 points 6 and 7; the fault
table and the routing rule are in docs/scaling.md):

- a front-end SIGKILLed mid-call leaves nothing half-stored and its leases lapse; the client's retry with the same
  idempotency key on the other front-end stores the pictures once, and a second retry returns them again;
- a client on the stateless 2026-07-28 protocol behind a round-robin balancer reaches both front-ends and sees every
  picture; a legacy client (an `Mcp-Session-Id`) needs sticky routing: its session is unknown to the other
  front-end (404, as documented), and a session opened there sees the same store.

Over the embedded store (a SQLite folder shared by two processes, docs/server.md) here, and over PostgreSQL + S3 in
the contained child pytest of tests/test_store_scaleout.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from klein_agent.rules.calls import IDEMPOTENCY_META_KEY
from klein_agent.rules.limits import LEASE_TTL_S
from klein_agent.service.store import ImageStore
from tests import store_servers
from tests.http_helpers import wait_listening
from tests.store_backends import postgres_s3, shared_names

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[1]
TOKEN = "front-end-test-token-0123456789abcdef"
BACKENDS = ["sqlite-folder", *(["postgresql+s3"] if store_servers.in_private_network() else [])]
READY = r"streamable HTTP at http://127\.0\.0\.1:(\d+)/mcp"
# A call long enough to be killed inside the model: 8 steps of two pictures (the kill lands within ms of step 1).
LONG = {"width": 256, "height": 256, "num_images": 2, "steps": 8, "seed": 11}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FrontEnds:
    """Start `serve --http --model tiny` processes on one store; open that store from the test."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend, self.tmp_path = backend, tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "KLEIN_AGENT_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
        if backend == "sqlite-folder":
            self.store_arg = str(tmp_path / "store")
        else:
            dsn, url = shared_names(tmp_path / "shared")
            endpoint = os.environ[store_servers.S3_ENDPOINT_ENV]
            self.env |= {
                **store_servers.s3_environment(endpoint),
                "KLEIN_TEST_DSN": dsn,
                "KLEIN_AGENT_BLOBS": url,
            }
            self.env["XDG_DATA_HOME"] = str(tmp_path / "data")
            self.store_arg = "env:KLEIN_TEST_DSN"

    def start(self, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
        log_path = self.tmp_path / f"{name}.log"
        args = ["serve", "--model", "tiny", "--http", "--port", "0", "--store", self.store_arg]
        args += ["--no-default-dirs", "--max-megapixels", "4.2", *extra]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "klein_agent", *args],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 90
        while not (found := re.search(READY, log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port = int(found.group(1))
        wait_listening(port)
        return proc, port

    def open_store(self) -> ImageStore:
        if self.backend == "sqlite-folder":
            return ImageStore(self.tmp_path / "store")
        return postgres_s3(self.tmp_path / "shared")

    def logs(self) -> str:
        return "".join(p.read_text() for p in self.tmp_path.glob("*.log"))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(params=BACKENDS)
def front_ends(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FrontEnds]:
    made = FrontEnds(str(request.param), tmp_path)
    yield made
    made.stop()
    assert TOKEN not in made.logs(), "the bearer token was logged"
    if made.backend != "sqlite-folder":
        assert store_servers.S3_SECRET not in made.logs(), "the S3 secret was logged"


@contextlib.asynccontextmanager
async def transport(port: int, *, keep_alive: bool = True) -> AsyncIterator[Any]:
    """Streamable HTTP with the bearer token; without keep-alive every request opens its own connection, so a
    balancer that picks a front-end per connection picks one per request."""
    limits = httpx2.Limits(max_keepalive_connections=None if keep_alive else 0)
    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=httpx2.Timeout(30.0, read=300.0),
            limits=limits,
        ) as http,
        streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http) as streams,
    ):
        yield streams


class RoundRobin:
    """A TCP balancer on 127.0.0.1: each new connection goes to the next front-end in turn (no stickiness)."""

    def __init__(self) -> None:
        self.ports: list[int] = []  # set before the first connection
        self.turn = itertools.count()
        self.sent: list[int] = []  # the front-end port of each connection, in order
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            port = self.ports[next(self.turn) % len(self.ports)]
            self.sent.append(port)
            upstream = socket.create_connection(("127.0.0.1", port))
            ends = threading.Barrier(2, action=lambda c=client, u=upstream: (c.close(), u.close()))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, ends), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, ends: threading.Barrier) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        ends.wait()  # both directions done: the pair is closed once

    def close(self) -> None:
        self.listener.close()


def no_half_stored(store: ImageStore) -> None:
    """Every row has its whole blob, and every blob its row (an orphan of a killed put is swept at open)."""
    rows = {image.image_id: image for image in store.list_images(limit=100)[0]}
    for image in rows.values():
        assert store.blobs.size(image.blob_key) == image.size_bytes, f"row {image.image_id} without its blob"
    assert {image.blob_key for image in rows.values()} == set(store.blobs.inventory()), "an orphan blob"


async def test_a_front_end_killed_mid_call_stores_nothing_and_the_retry_elsewhere_stores_once(
    front_ends: FrontEnds,
) -> None:
    proc_a, port_a = front_ends.start("a")
    _, port_b = front_ends.start("b")
    async with Client(transport(port_b), mode="2026-07-28") as client:
        source = await client.call_tool(
            "generate", {"prompt": "a kite", "width": 64, "height": 64, "seed": 1}
        )
        assert not source.is_error, source.content
    source_id = source.structured_content["images"][0]["image_id"]
    key = f"retry-{random.getrandbits(64):016x}"
    arguments = {"prompt": "the kite at night", "image": source_id, **LONG}
    killed_at: list[float] = []

    async def kill_inside_the_model(value: float, total: float | None, message: str | None) -> None:
        if not killed_at and value >= 2:  # past the prompt: the model is stepping
            proc_a.send_signal(signal.SIGKILL)
            killed_at.append(time.time())

    with pytest.raises(Exception):  # noqa: B017 - the connection dies with the process; its class is the SDK's
        async with Client(transport(port_a), mode="2026-07-28") as client:
            await client.call_tool(
                "edit", arguments, progress_callback=kill_inside_the_model, meta={IDEMPOTENCY_META_KEY: key}
            )
    assert killed_at and proc_a.wait(10) == -signal.SIGKILL

    with front_ends.open_store() as store:
        assert store.stats().count == 1, "the killed call stored something"
        no_half_stored(store)
        held = [row for row in store.catalog.lease_rows() if row.image_id == source_id]
        # the dead front-end's lease on its input: never renewed again, so it lapses within the TTL
        assert held and all(row.expires_at <= killed_at[0] + LEASE_TTL_S + 1 for row in held), held
        store.catalog.purge_expired_leases(killed_at[0] + LEASE_TTL_S + 1)
        assert not [row for row in store.catalog.lease_rows() if row.image_id == source_id]

    async with Client(transport(port_b), mode="2026-07-28") as client:
        first = await client.call_tool("edit", arguments, meta={IDEMPOTENCY_META_KEY: key})
        again = await client.call_tool("edit", arguments, meta={IDEMPOTENCY_META_KEY: key})
    assert not first.is_error and not again.is_error, (first, again)
    made = [image["image_id"] for image in first.structured_content["images"]]
    assert len(made) == 2 and [image["image_id"] for image in again.structured_content["images"]] == made
    with front_ends.open_store() as store:
        assert store.stats().count == 3  # the source and the two pictures, once
        no_half_stored(store)


async def test_stateless_clients_use_any_front_end_and_legacy_sessions_need_sticky_routing(
    front_ends: FrontEnds,
) -> None:
    balancer = RoundRobin()
    public = f"127.0.0.1:{balancer.port}"  # the name clients use: every front-end must accept it as its Host
    ports = [front_ends.start(name, "--allowed-host", public)[1] for name in ("a", "b")]
    balancer.ports = ports
    try:
        made = []
        async with Client(transport(balancer.port, keep_alive=False), mode="2026-07-28") as client:
            for k in range(4):
                result = await client.call_tool(
                    "generate", {"prompt": f"kite {k}", "width": 64, "height": 64, "seed": k}
                )
                assert not result.is_error, result.content
                made.append(result.structured_content["images"][0]["image_id"])
                listed = await client.call_tool("list_images", {"limit": 50})
                assert set(made) <= {i["image_id"] for i in listed.structured_content["images"]}
            status = await client.call_tool("server_status", {})
            answers = repr([result, listed, status])  # what a client is told, text and structured
            assert not status.is_error and TOKEN not in answers and store_servers.S3_SECRET not in answers
        assert set(balancer.sent) == set(ports), "the balancer reached only one front-end"

        # A legacy session lives in the front-end that opened it: through a balancer that is not sticky, its next
        # request reaches the other front-end, which answers 404 "Session not found" (docs/scaling.md).
        with pytest.raises(Exception) as refused:
            async with Client(transport(balancer.port, keep_alive=False), mode="legacy") as client:
                for _ in range(3):
                    await client.call_tool("list_images", {"limit": 50})
        assert "404" in repr(refused.value) or "Session not found" in repr(refused.value), refused.value
        for port in ports:  # pinned to one front-end (sticky routing), a legacy session sees every picture
            async with Client(transport(port), mode="legacy") as client:
                for _ in range(3):
                    listed = await client.call_tool("list_images", {"limit": 50})
                assert set(made) <= {i["image_id"] for i in listed.structured_content["images"]}
    finally:
        balancer.close()
