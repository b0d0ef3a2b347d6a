"""The engine when its caller stops listening: a progress notification that never completes (a client that stopped
reading, a loop shutting down) must not hold the worker, leak a thread exception, or outlive the engine's close."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import anyio
import pytest

from klein_agent.rules.requests import GenerationRequest
from klein_agent.service.engine import Engine, EngineState, JobCancelled
from tests.fakes import FakeGenerator

pytestmark = pytest.mark.anyio

# far below the caller's own 60 s wait for a stopping job, far above a loaded CI machine's scheduling delays
LET_GO_S = 15.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def thread_errors() -> Iterator[list[BaseException]]:
    """Exceptions that escaped any thread while the test ran (a dead worker prints a traceback to the log)."""
    caught: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: caught.append(args.exc_value or RuntimeError("no exception value"))
    try:
        yield caught
    finally:
        threading.excepthook = previous


def started(fake: FakeGenerator) -> Engine:
    engine = Engine(lambda: fake)
    engine.start()
    assert engine.wait_loaded(10) == EngineState.READY
    return engine


def request(steps: int = 8) -> GenerationRequest:
    return GenerationRequest(prompt="a red cube", width=64, height=64, seed=1, steps=steps)


class StuckClient:
    """A progress callback that stops returning at the generator's first report (sent by the worker; the engine's
    own "starting" heartbeats before it, below 1, pass): a client that stopped reading."""

    def __init__(self) -> None:
        self.reached = anyio.Event()
        self.reports = 0

    async def __call__(self, value: float, total: float | None, message: str) -> None:
        if value < 1:
            return
        self.reports += 1
        self.reached.set()
        await anyio.sleep_forever()


async def test_a_caller_that_leaves_during_a_stuck_notification_lets_the_worker_go(
    thread_errors: list[BaseException],
) -> None:
    fake = FakeGenerator()
    engine = started(fake)
    client = StuckClient()
    scope = anyio.CancelScope()
    finished: list[float] = []

    async def call() -> None:
        with scope:
            await engine.run(request(), progress=client)
        finished.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(LET_GO_S):
            await client.reached.wait()
        left_at = time.monotonic()
        scope.cancel()
    assert finished and finished[0] - left_at < LET_GO_S, "the caller waited for the worker to be let go"
    assert client.reports == 1, "no report after the one in flight"
    assert fake.steps_run == [0], "stopped at the first report, before any step"
    status = engine.status()
    assert status.cancelled == 1 and status.failed == 0 and not status.running
    done = await engine.run(request(steps=2))  # the worker is free and serves the next call
    assert len(done.result.images) == 1
    await engine.aclose()
    assert thread_errors == []


async def test_closing_the_engine_lets_go_of_a_worker_held_by_a_stuck_notification(
    thread_errors: list[BaseException],
) -> None:
    before = set(threading.enumerate())
    fake = FakeGenerator()
    engine = started(fake)
    client = StuckClient()
    outcome: list[BaseException] = []

    async def call() -> None:
        try:
            await engine.run(request(), progress=client)
        except JobCancelled as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(LET_GO_S):
            await client.reached.wait()
        closing = time.monotonic()
        await engine.aclose(timeout=LET_GO_S)  # as `serve --http` does before its loop ends
        assert time.monotonic() - closing < LET_GO_S
    workers = [t for t in set(threading.enumerate()) - before if t.name.startswith("klein-engine")]
    assert workers == [], "a worker outlived close"
    assert len(outcome) == 1, "the caller is told its call stopped"
    assert engine.state == EngineState.STOPPED
    assert thread_errors == []


def test_close_keeps_its_timeout_when_the_callers_loop_is_not_running(
    thread_errors: list[BaseException],
) -> None:
    """A caller's loop that exists but does not run (an `asyncio.Runner` between runs, a loop in teardown) would
    never run a callback close waited for: close posts its word to that loop and keeps its own timeout."""
    import asyncio

    engine = started(FakeGenerator())
    runner = asyncio.Runner()
    reached = threading.Event()

    async def stuck(value: float, total: float | None, message: str) -> None:
        if value >= 1:
            reached.set()
            await asyncio.sleep(3600)

    async def leave_a_call_running() -> None:
        task = asyncio.ensure_future(engine.run(request(), progress=stuck))
        while not reached.is_set():
            await asyncio.sleep(0.01)
        leave_a_call_running.task = task  # type: ignore[attr-defined]  # pending when this run ends

    try:
        runner.run(leave_a_call_running())
        closed = threading.Event()
        threading.Thread(target=lambda: (engine.close(timeout=1.0), closed.set()), daemon=True).start()
        assert closed.wait(LET_GO_S), "close waited on a loop that does not run"
    finally:
        runner.close()  # runs the loop once more: the posted word and the call's cancellation
    assert thread_errors == []
