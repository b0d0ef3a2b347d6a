"""Two processes on one store (docs/server.md, "The image store": several servers may share one): a server's edit
is held inside the model while another process fills the store past its bound, or the input is deleted. The
finished picture must be stored either way (issue 18, point 6).

The server is in this process (a Studio behind the real MCP server, an in-process SDK client, a gated fake model so
the test decides when the model finishes); the other process is tests/store_writer.py, a real writer with its own
connection, its own (small) bound and its own eviction."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from mcp import Client

from klein_agent.rules.calls import Edit
from klein_agent.server.app import build_server
from klein_agent.service.store import ImageStore
from tests.conftest import make_server_state
from tests.fakes import FakeGenerator, png_bytes
from tests.store_writer import tiny_png

pytestmark = pytest.mark.anyio

WRITER = Path(__file__).with_name("store_writer.py")
REPO = Path(__file__).resolve().parents[1]
WRITER_MAX_IMAGES = 4


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def gated(tmp_path: Path, input_dir: Path) -> Iterator[tuple[Any, FakeGenerator, threading.Event]]:
    gate = threading.Event()
    fake = FakeGenerator(gate=gate, gate_at_step=2)
    state = make_server_state(lambda: fake, tmp_path / "store", input_dir)
    try:
        yield state, fake, gate
    finally:
        gate.set()
        state.engine.close()
        state.store.close()


def fill_from_another_process(root: Path, images: int) -> None:
    """Run tests/store_writer.py on `root` (bound: WRITER_MAX_IMAGES) until it has acknowledged `images` puts,
    then SIGKILL it: every older image it may evict has been evicted by then."""
    with subprocess.Popen(
        [sys.executable, str(WRITER), str(root), str(WRITER_MAX_IMAGES), "7"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n", "the writer did not start"
            for _ in range(images):
                assert proc.stdout.readline().startswith("img_"), "the writer stopped"
        finally:
            proc.send_signal(signal.SIGKILL)


def stored_input(state: Any, seed: int) -> str:
    png = tiny_png(64, random.Random(seed))
    return str(state.store.put(png, width=64, height=64, recipe={"tool": "import"}).image_id)


async def held_edit(
    state: Any, fake: FakeGenerator, gate: threading.Event, arguments: dict[str, Any], meanwhile: Any
) -> Any:
    """Call `edit`, run `meanwhile()` (on a thread) while the model is held at its second step, then let it
    finish; returns the tool result."""
    result: list[Any] = []
    async with Client(build_server(state)) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            result.append(await client.call_tool("edit", arguments))

        tg.start_soon(call)
        with anyio.fail_after(30):
            while not (fake.entered.is_set() or result):
                await anyio.sleep(0.01)
        assert not result, f"the call ended before the model ran: {result[0].content}"
        await anyio.to_thread.run_sync(meanwhile)
        gate.set()
    return result[0]


@pytest.mark.parametrize("attempt", [1, 2, 3])
async def test_another_process_filling_the_store_does_not_evict_a_running_edits_input(
    gated: tuple[Any, FakeGenerator, threading.Event], attempt: int
) -> None:
    state, fake, gate = gated
    source = stored_input(state, attempt)
    made = await held_edit(
        state,
        fake,
        gate,
        {"image": source, "prompt": "at night", "seed": attempt},
        lambda: fill_from_another_process(state.store.root, 3 * WRITER_MAX_IMAGES),
    )
    text = "".join(getattr(block, "text", "") for block in made.content)
    assert not made.is_error, text
    (picture,) = made.structured_content["images"]
    assert picture["parents"] == [source]
    assert state.store.exists(source), "the leased input was evicted by the other process"
    assert state.store.get(picture["image_id"]).parents == (source,)
    assert "no longer in the store" not in text


async def test_an_input_deleted_while_the_model_runs_costs_no_picture(
    gated: tuple[Any, FakeGenerator, threading.Event], input_dir: Path
) -> None:
    state, fake, gate = gated
    source = stored_input(state, 11)
    (input_dir / "other.png").write_bytes(png_bytes(32, 32))
    made = await held_edit(
        state,
        fake,
        gate,
        {"image": source, "prompt": "at night", "seed": 5},
        lambda: state.store.delete(source),
    )
    text = "".join(getattr(block, "text", "") for block in made.content)
    assert not made.is_error, text
    (picture,) = made.structured_content["images"]
    assert not state.store.exists(source)
    stored = state.store.get(picture["image_id"])
    assert stored.parents == (source,) and picture["parents"] == [source], "the lineage keeps the parent id"
    assert f"{source} is no longer in the store" in text


async def test_a_cancelled_edit_releases_its_leases(
    gated: tuple[Any, FakeGenerator, threading.Event],
) -> None:
    state, fake, gate = gated
    source = stored_input(state, 12)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: state.make(Edit(prompt="at night", image=source)))
            with anyio.fail_after(30):
                while not fake.entered.is_set():
                    await anyio.sleep(0.01)
            assert leased(state.store.root) == [source]
            scope.cancel()
            gate.set()  # the model stops at its next step, where the engine sees the cancellation
    assert leased(state.store.root) == [], "a cancelled call kept its inputs leased"


def leased(root: Path) -> list[str]:
    """The leased ids, through the catalog interface of a read-only store (as another process would see them)."""
    with ImageStore(root, read_only=True) as reader:
        return list(dict.fromkeys(row.image_id for row in reader.catalog.lease_rows()))
