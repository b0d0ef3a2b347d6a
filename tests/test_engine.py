"""The engine on its own: FIFO, one call at a time, busy, cancellation, load state, OOM mapping, progress."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import anyio
import pytest

from klein_agent.rules.requests import GenerationRequest, GenerationResult
from klein_agent.service.engine import (
    Engine,
    EngineBusyError,
    EngineState,
    GenerationFailedError,
    ModelLoadError,
    ModelOutOfMemoryError,
)
from tests.fakes import FakeGenerator

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def request(prompt: str = "a red cube", **kw: object) -> GenerationRequest:
    args: dict[str, object] = {"width": 64, "height": 64, "seed": 1, **kw}
    return GenerationRequest(prompt=prompt, **args)  # type: ignore[arg-type]


async def run(engine: Engine, req: GenerationRequest, **kw: object) -> GenerationResult:
    """One call's pictures (the engine also reports its queued and model time)."""
    done = await engine.run(req, **kw)  # type: ignore[arg-type]
    assert done.model_ms > 0 and done.queued_ms >= 0
    return done.result


def started(fake: FakeGenerator, **kw: object) -> Engine:
    engine = Engine(lambda: fake, **kw)  # type: ignore[arg-type]
    engine.start()
    assert engine.wait_loaded(10) == EngineState.READY
    return engine


async def test_runs_and_reports_monotone_progress() -> None:
    fake = FakeGenerator()
    engine = started(fake)
    seen: list[tuple[float, float | None, str]] = []

    async def progress(value: float, total: float | None, message: str) -> None:
        seen.append((value, total, message))

    result = await run(engine, request(steps=4), progress=progress)
    n_at_return = len(seen)
    await anyio.sleep(0.05)
    assert len(seen) == n_at_return, "no progress after the call returned"
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    values = [v for v, _, _ in seen]
    assert values == sorted(set(values)) and values[-1] == 6.0
    assert any("step 4/4" in m for _, _, m in seen)
    status = engine.status()
    assert status.state == EngineState.READY and status.completed == 1 and status.queue_depth == 0
    await engine.aclose()
    assert engine.state == EngineState.STOPPED


async def test_fifo_order_and_one_call_at_a_time() -> None:
    fake = FakeGenerator(step_delay_s=0.001, gate=threading.Event())
    engine = started(fake, max_queue=64)
    finished: list[int] = []

    async def one(i: int) -> None:
        await run(engine, request(f"call {i}"))
        finished.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(one, i)
            await anyio.sleep(0)  # submission order is the start order
        await anyio.to_thread.run_sync(fake.entered.wait, 10)
        assert engine.status().queue_depth == 29 and engine.status().running
        fake.gate.set()  # type: ignore[union-attr]
    assert [r.prompt for r in fake.calls] == [f"call {i}" for i in range(30)]
    assert finished == list(range(30))
    assert fake.max_active == 1
    await engine.aclose()


async def test_queue_full_is_refused_at_once() -> None:
    fake = FakeGenerator(gate=threading.Event())
    engine = started(fake, max_queue=2)
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await run(engine, request())
            outcomes.append("ok")
        except EngineBusyError as exc:
            outcomes.append(str(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        await anyio.to_thread.run_sync(fake.entered.wait, 10)
        tg.start_soon(one)
        tg.start_soon(one)
        with anyio.fail_after(10):  # a hang guard, not a measure: the two calls are queued behind the gate
            while engine.status().queue_depth < 2:
                await anyio.sleep(0.001)
        # "At once" means without waiting for a slot: the running call is held at its gate until after the
        # refusal, so a call that waited would still be waiting (and trip the hang guard) instead of raising.
        with pytest.raises(EngineBusyError, match="busy"), anyio.fail_after(10):
            await run(engine, request())
        status = engine.status()
        assert status.running and status.queue_depth == 2 and len(fake.calls) == 1
        fake.gate.set()  # type: ignore[union-attr]
    assert outcomes == ["ok", "ok", "ok"]
    await engine.aclose()


async def test_cancel_running_call_stops_between_steps_and_returns_nothing() -> None:
    fake = FakeGenerator(gate=threading.Event(), gate_at_step=2)
    engine = started(fake)
    finished: list[int] = []
    scope = anyio.CancelScope()

    async def call() -> None:
        with scope:
            await engine.run(request(steps=8))
            finished.append(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.to_thread.run_sync(fake.entered.wait, 10)
        scope.cancel()
        await anyio.sleep(0.05)  # the call notices its cancellation and flags the job
        fake.gate.set()  # type: ignore[union-attr]
    assert finished == []
    assert fake.steps_run == [2], "stops at the first step boundary after the cancel"
    assert engine.status().cancelled == 1
    result = await run(engine, request(steps=2))  # the next call works
    assert len(result.images) == 1
    await engine.aclose()


async def test_cancel_queued_call_removes_it() -> None:
    fake = FakeGenerator(gate=threading.Event())
    engine = started(fake)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, engine, request("first"))
        await anyio.to_thread.run_sync(fake.entered.wait, 10)
        with anyio.move_on_after(0.1):
            await run(engine, request("second"))
        assert engine.status().queue_depth == 0
        fake.gate.set()  # type: ignore[union-attr]
    assert [r.prompt for r in fake.calls] == ["first"]
    await engine.aclose()


async def test_first_call_waits_for_the_model_with_loading_progress() -> None:
    release = threading.Event()
    fake = FakeGenerator()

    def slow_load() -> FakeGenerator:
        release.wait(10)
        return fake

    engine = Engine(slow_load, heartbeat_s=0.05)
    engine.start()
    assert engine.state == EngineState.LOADING
    messages: list[str] = []

    async def progress(value: float, total: float | None, message: str) -> None:
        messages.append(message)
        if len(messages) == 3:
            release.set()

    result = await run(engine, request(), progress=progress)
    assert len(result.images) == 1
    assert messages[:3] == ["loading model"] * 3 and messages[-1] == "decoding"
    assert engine.status().load_seconds is not None
    await engine.aclose()


async def test_failed_load_is_reported_and_refuses_calls() -> None:
    def broken() -> FakeGenerator:
        raise FileNotFoundError("no weights in /nowhere")

    engine = Engine(broken)
    engine.start()
    assert engine.wait_loaded(10) == EngineState.FAILED
    assert "no weights in /nowhere" in (engine.status().error or "")
    with pytest.raises(ModelLoadError, match=r"failed to load.*no weights"):
        await run(engine, request())
    await engine.aclose()


class OutOfMemoryError(RuntimeError):  # same class name as torch.cuda.OutOfMemoryError
    pass


@pytest.mark.parametrize(
    "exc",
    [
        OutOfMemoryError("CUDA error"),
        RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
        MemoryError(),
    ],
)
async def test_out_of_memory_is_mapped_and_the_engine_keeps_serving(exc: BaseException) -> None:
    fake = FakeGenerator(fail_with=exc)
    engine = started(fake)
    with pytest.raises(ModelOutOfMemoryError, match=r"out of memory making 1 image.*64x64.*smaller size"):
        await run(engine, request())
    assert len((await run(engine, request())).images) == 1
    assert engine.status().failed == 1
    await engine.aclose()


async def test_other_model_errors_become_generation_failed() -> None:
    engine = started(FakeGenerator(fail_with=ValueError("bad tensor shape")))
    with pytest.raises(
        GenerationFailedError,
        match=r"^the model failed on this call: bad tensor shape \(the server log has the details\)$",
    ):
        await run(engine, request())
    await engine.aclose()


async def test_max_queue_zero_runs_one_call_and_refuses_the_rest() -> None:
    fake = FakeGenerator(gate=threading.Event())
    engine = started(fake, max_queue=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, engine, request("only"))
        await anyio.to_thread.run_sync(fake.entered.wait, 10)
        with pytest.raises(EngineBusyError, match="0 calls are queued and one is running"):
            await run(engine, request("refused"))
        fake.gate.set()  # type: ignore[union-attr]
    assert len((await run(engine, request("later"))).images) == 1, "idle again: accepted"
    await engine.aclose()


async def test_calls_wait_for_a_loading_model_up_to_the_queue_bound() -> None:
    release = threading.Event()
    fake = FakeGenerator()

    def slow_load() -> FakeGenerator:
        release.wait(10)
        return fake

    engine = Engine(slow_load, max_queue=1)
    engine.start()
    results: list[int] = []

    async def one() -> None:
        results.append(len((await run(engine, request())).images))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
        await anyio.sleep(0.05)
        with pytest.raises(EngineBusyError, match="still loading and 2 calls are waiting"):
            await run(engine, request())
        release.set()
    assert results == [1, 1]
    await engine.aclose()


def test_torch_out_of_memory_is_recognised_by_name() -> None:
    torch = pytest.importorskip("torch")
    from klein_agent.service.engine import is_out_of_memory

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


async def test_the_ready_log_line_is_readable(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeGenerator()
    fake.info = replace(fake.info, model="/models/klein", variant="klein-4b", loras=(("ink", 1.0),))
    with caplog.at_level(logging.INFO, logger="klein_agent"):
        engine = started(fake)
        deadline = time.monotonic() + 60  # a hang guard: the line is logged just after the state turns ready
        while (
            not any("model ready" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline
        ):
            await anyio.sleep(0.01)
    ready = [r.getMessage() for r in caplog.records if "model ready" in r.getMessage()]
    assert len(ready) == 1 and ready[0].endswith("s: klein-4b (/models/klein) on cpu, float32, LoRA ink"), (
        ready
    )
    await engine.aclose()
