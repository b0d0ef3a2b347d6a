"""Queueing, cancellation, back-pressure and failures through a real client. A fake model is used here because
each test must hold a call at a known step (the real tiny model is too fast to catch mid-run)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from klein_agent.server.app import build_server
from tests.conftest import make_server_state
from tests.fakes import FakeGenerator

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def serving(
    factory: Callable[[], Any], tmp_path: Path, mode: str, **options: Any
) -> AsyncIterator[Any]:
    folder = tmp_path / "inputs"
    folder.mkdir(exist_ok=True)
    state = make_server_state(factory, tmp_path / "store", folder, **options)
    try:
        async with Client(build_server(state), mode=mode) as client:
            yield client, state
    finally:
        await state.engine.aclose()
        state.store.close()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def test_many_concurrent_calls_are_all_answered_in_fifo_order_one_at_a_time(
    tmp_path: Path, mode: str
) -> None:
    fake = FakeGenerator(gate=threading.Event(), step_delay_s=0.001)
    n = 24
    results: dict[int, Any] = {}
    async with serving(lambda: fake, tmp_path, mode, max_queue=n) as (client, state):

        async def one(k: int) -> None:
            results[k] = await client.call_tool("generate", {"prompt": f"call {k}", "seed": k, **SMALL})

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0)
            await anyio.to_thread.run_sync(fake.entered.wait, 10)
            for k in range(1, n):
                tg.start_soon(one, k)
                await until(lambda k=k: state.engine.status().queue_depth == k)  # submitted in this order
            fake.gate.set()  # type: ignore[union-attr]
        assert sorted(results) == list(range(n))
        assert all(not r.is_error for r in results.values())
        assert [r.prompt for r in fake.calls] == [f"call {k}" for k in range(n)], "first in, first out"
        assert fake.max_active == 1, "one call in the model at a time"
        page, _ = state.store.list_images(limit=100)
        # Every call stored once. The store lists in the order results were written, which a loaded machine may
        # interleave (each result is written off the model's thread while the next call runs); the model order
        # above is the queue's promise.
        assert sorted(img.recipe["prompt"] for img in page) == sorted(f"call {k}" for k in range(n))
        for k, result in results.items():
            assert result.structured_content["images"][0]["seed"] == k


async def test_cancelling_a_running_call_stops_it_within_one_step_and_stores_nothing(
    tmp_path: Path, mode: str
) -> None:
    fake = FakeGenerator(gate=threading.Event(), gate_at_step=2)
    async with serving(lambda: fake, tmp_path, mode) as (client, state):
        scope = anyio.CancelScope()

        async def doomed() -> None:
            with scope:
                await client.call_tool("generate", {"prompt": "long job", "steps": 8, **SMALL})

        async with anyio.create_task_group() as tg:
            tg.start_soon(doomed)
            await anyio.to_thread.run_sync(fake.entered.wait, 10)
            scope.cancel()
            await until(lambda: state.engine.status().cancelling)  # the server saw the cancellation
            fake.gate.set()  # type: ignore[union-attr]
        await until(lambda: not state.engine.status().running)
        assert fake.steps_run == [2], "the step in progress finishes, and no other one runs"
        assert state.engine.status().cancelled == 1
        assert state.store.stats().count == 0
        fake.gate = None
        after = await client.call_tool("generate", {"prompt": "next", **SMALL})
        assert not after.is_error and state.store.stats().count == 1


async def test_cancelling_a_queued_call_removes_it_and_the_next_call_succeeds(
    tmp_path: Path, mode: str
) -> None:
    fake = FakeGenerator(gate=threading.Event())
    async with serving(lambda: fake, tmp_path, mode) as (client, state):
        first: list[Any] = []
        scope = anyio.CancelScope()

        async def queued() -> None:
            with scope:
                await client.call_tool("generate", {"prompt": "queued", **SMALL})

        async def running() -> None:
            first.append(await client.call_tool("generate", {"prompt": "running", **SMALL}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(running)
            await anyio.to_thread.run_sync(fake.entered.wait, 10)
            tg.start_soon(queued)
            await until(lambda: state.engine.status().queue_depth == 1)
            scope.cancel()
            await until(lambda: state.engine.status().queue_depth == 0)
            fake.gate.set()  # type: ignore[union-attr]
        assert not first[0].is_error
        assert [r.prompt for r in fake.calls] == ["running"], "the cancelled call never reached the model"
        fake.gate = None
        assert not (await client.call_tool("generate", {"prompt": "next", **SMALL})).is_error
        assert [r.prompt for r in fake.calls] == ["running", "next"]
        assert state.store.stats().count == 2


async def test_a_full_queue_answers_busy_at_once(tmp_path: Path, mode: str) -> None:
    fake = FakeGenerator(gate=threading.Event())
    async with serving(lambda: fake, tmp_path, mode, max_queue=2) as (client, state):
        done: list[Any] = []

        async def one(k: int) -> None:
            done.append(await client.call_tool("generate", {"prompt": f"call {k}", **SMALL}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0)
            await anyio.to_thread.run_sync(fake.entered.wait, 10)
            tg.start_soon(one, 1)
            tg.start_soon(one, 2)
            await until(lambda: state.engine.status().queue_depth == 2)
            # "At once": the answer comes while the running call is still held at its gate, so it cannot have
            # waited for a slot (a call that waited would trip this hang guard, which measures nothing).
            with anyio.fail_after(60):
                busy = await client.call_tool("generate", {"prompt": "one too many", **SMALL})
            status = state.engine.status()
            assert status.running and status.queue_depth == 2 and [r.prompt for r in fake.calls] == ["call 0"]
            fake.gate.set()  # type: ignore[union-attr]
        assert busy.is_error and "busy: 2 calls are queued and one is running" in busy.content[0].text
        assert len(done) == 3 and not any(r.is_error for r in done)
        assert "one too many" not in [r.prompt for r in fake.calls]


async def test_a_generator_of_two_runs_two_calls_at_once_and_each_is_stored(
    tmp_path: Path, mode: str
) -> None:
    """Through a real client: a generator that takes two calls (as a Ray application of two replicas says) has two
    calls inside it at once, a third waits, a fourth is refused counting the queue and the running calls apart,
    server_status says how many run of how many, and every call that ran is stored once."""
    fake = FakeGenerator(
        max_in_flight=2,
        holds={"call 0": threading.Event(), "call 1": threading.Event()},
        reached={"call 0": threading.Event(), "call 1": threading.Event()},
    )
    async with serving(lambda: fake, tmp_path, mode, max_queue=1) as (client, state):
        done: list[Any] = []

        async def one(k: int) -> None:
            done.append(await client.call_tool("generate", {"prompt": f"call {k}", **SMALL}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0)
            assert await anyio.to_thread.run_sync(fake.reached["call 0"].wait, 10)
            tg.start_soon(one, 1)
            assert await anyio.to_thread.run_sync(fake.reached["call 1"].wait, 10), "both held inside at once"
            tg.start_soon(one, 2)
            await until(lambda: state.engine.status().queue_depth == 1)
            with anyio.fail_after(60):  # a hang guard: the refusal comes while both calls are held
                busy = await client.call_tool("generate", {"prompt": "one too many", **SMALL})
            status = await client.call_tool("server_status", {})
            assert "Queue: 2 of 2 running, 1 waiting (max 1)" in status.content[0].text
            assert [r.prompt for r in fake.calls] == ["call 0", "call 1"]
            fake.holds["call 0"].set()
            fake.holds["call 1"].set()
        assert busy.is_error and "busy: 1 calls are queued and 2 are running" in busy.content[0].text
        assert len(done) == 3 and not any(r.is_error for r in done) and fake.max_active == 2
        ids = [r.structured_content["images"][0]["image_id"] for r in done]
        listed = (await client.call_tool("list_images", {})).structured_content["images"]
        assert sorted(image["image_id"] for image in listed) == sorted(ids), "each call stored once"


async def test_out_of_memory_is_a_clear_error_and_the_server_keeps_serving(tmp_path: Path, mode: str) -> None:
    fake = FakeGenerator(fail_with=RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    async with serving(lambda: fake, tmp_path, mode) as (client, state):
        result = await client.call_tool("generate", {"prompt": "huge", "num_images": 4, **SMALL})
        assert result.is_error
        assert "out of memory making 4 image(s) of 64x64" in result.content[0].text
        assert "smaller size" in result.content[0].text
        assert state.store.stats().count == 0
        assert not (await client.call_tool("generate", {"prompt": "small", **SMALL})).is_error


async def test_a_model_that_fails_to_load_is_reported_and_the_server_stays_up(
    tmp_path: Path, mode: str
) -> None:
    def broken() -> FakeGenerator:
        raise FileNotFoundError("no transformer weights in /models/klein")

    async with serving(broken, tmp_path, mode) as (client, state):
        await until(lambda: state.engine.status().state == "failed")
        result = await client.call_tool("generate", {"prompt": "anything", **SMALL})
        assert result.is_error and "failed to load" in result.content[0].text
        assert "no transformer weights in /models/klein" in result.content[0].text
        status = (await client.call_tool("server_status", {})).structured_content
        assert status["model"]["state"] == "failed" and "no transformer weights" in status["model"]["error"]
        assert not (await client.call_tool("list_images", {})).is_error


async def test_failure_texts_name_no_exception_classes_and_end_sentences_once(
    tmp_path: Path, mode: str
) -> None:
    """Agent-facing failure texts read as sentences: no `CheckpointError:`, no `..`; the log keeps the class."""

    class CheckpointError(ValueError):  # the loader's error for a model that is not cached
        pass

    def not_cached() -> FakeGenerator:
        raise CheckpointError(
            "klein-4b is not in the local cache: download it first, or add --allow-download."
        )

    async with serving(not_cached, tmp_path, mode) as (client, state):
        await until(lambda: state.engine.status().state == "failed")
        status = await client.call_tool("server_status", {})
        text, error = status.content[0].text, status.structured_content["model"]["error"]
        assert (
            "Model failed to load: klein-4b is not in the local cache" in text
            and "--allow-download. Queue" in text
        )
        refused = (await client.call_tool("generate", {"prompt": "x", **SMALL})).content[0].text
        for shown in (text, error, refused):
            assert "CheckpointError" not in shown and ".." not in shown, shown

    fake = FakeGenerator(fail_with=KeyError("transformer.blocks.0"))
    (tmp_path / "second").mkdir()
    async with serving(lambda: fake, tmp_path / "second", mode) as (client, _):
        failed = await client.call_tool("generate", {"prompt": "x", **SMALL})
        assert failed.is_error and "KeyError" not in failed.content[0].text
        assert (
            "the model failed on this call: missing 'transformer.blocks.0' (the server log has the details)"
            in (failed.content[0].text)
        )


async def test_the_first_call_waits_for_the_model_with_loading_progress(tmp_path: Path, mode: str) -> None:
    release = threading.Event()
    fake = FakeGenerator()

    def slow_load() -> FakeGenerator:
        release.wait(20)
        return fake

    messages: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")
        release.set()  # the first "loading model" report lets the load finish

    async with serving(slow_load, tmp_path, mode, heartbeat_s=0.05) as (client, _state):
        status = (await client.call_tool("server_status", {})).structured_content
        assert status["model"]["state"] == "loading", "initialize and status answer while the model loads"
        result = await client.call_tool(
            "generate", {"prompt": "first", **SMALL}, progress_callback=on_progress
        )
        assert not result.is_error
        assert messages[0] == "loading model" and messages[-1] == "decoding"
        assert (await client.call_tool("server_status", {})).structured_content["model"]["state"] == "ready"
