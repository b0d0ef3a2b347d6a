"""The engine with a generator that takes several calls at once (issue 20: one front-end keeps several replicas
busy): calls overlap up to the generator's `max_in_flight`, start in arrival order, each with its own progress,
cancellation and accounting, and the "busy" refusal counts queued and running calls apart. A local model (no
`max_in_flight`) still runs one call at a time on the thread that loaded it.

Overlap is shown by events (a call held inside the generator while another enters it), never by wall time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest

from klein_agent.rules.busy import busy_message, retry_after_s
from klein_agent.rules.requests import GenerationRequest, ImageGenerator, max_in_flight
from klein_agent.service.engine import Engine, EngineBusyError, EngineState, FinishedRun
from tests.fakes import FakeGenerator

pytestmark = pytest.mark.anyio
HANG_S = 20  # a hang guard for waits on events, not a measure


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def request(prompt: str, steps: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, width=64, height=64, seed=1, steps=steps)


def held_fake(prompts: list[str], in_flight: int) -> FakeGenerator:
    """A fake taking `in_flight` calls at once, holding each of `prompts` at its first step until released."""
    return FakeGenerator(
        max_in_flight=in_flight,
        holds={p: threading.Event() for p in prompts},
        reached={p: threading.Event() for p in prompts},
    )


def started(factory: Callable[[], ImageGenerator], **kw: int) -> Engine:
    engine = Engine(factory, **kw)
    engine.start()
    assert engine.wait_loaded(HANG_S) == EngineState.READY
    return engine


async def reached(fake: FakeGenerator, prompt: str) -> None:
    """Until the call `prompt` is held inside the generator (fails after HANG_S)."""
    assert await anyio.to_thread.run_sync(fake.reached[prompt].wait, HANG_S), (
        f"{prompt!r} never reached the model"
    )


async def test_two_calls_run_at_once_on_a_generator_that_takes_two() -> None:
    fake = held_fake(["a", "b"], in_flight=2)
    engine = started(lambda: fake)
    results: dict[str, FinishedRun] = {}
    progress: dict[str, list[float]] = {"a": [], "b": []}

    async def one(prompt: str) -> None:
        async def heard(value: float, total: float | None, message: str) -> None:
            progress[prompt].append(value)

        results[prompt] = await engine.run(request(prompt), progress=heard)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(one, "a")
        await reached(fake, "a")
        tasks.start_soon(one, "b")
        await reached(fake, "b")  # "a" is still held inside the generator: the two overlap
        status = engine.status()
        assert (status.running_calls, status.queue_depth, status.max_in_flight) == (2, 0, 2)
        assert [event for event, _, _ in fake.log] == ["start", "start"]
        fake.holds["b"].set()  # the second finishes first: neither waits for the other
        with anyio.fail_after(HANG_S):
            while "b" not in results:
                await anyio.sleep(0.005)
        assert "a" not in results and engine.status().running_calls == 1
        fake.holds["a"].set()
    assert fake.max_active == 2
    assert {thread for _, _, thread in fake.log} == {"klein-engine", "klein-engine-1"}
    for prompt in "ab":  # each call's own progress, whole and rising, to its own end
        assert progress[prompt] == sorted(set(progress[prompt])) and progress[prompt][-1] == 6.0
        assert results[prompt].result.images[0].size == (64, 64)
    assert engine.status().completed == 2
    await engine.aclose()


async def test_cancelling_one_of_two_running_calls_leaves_the_other() -> None:
    fake = held_fake(["a", "b"], in_flight=2)
    engine = started(lambda: fake)
    finished: list[str] = []
    scope = anyio.CancelScope()

    async def cancelled_one() -> None:
        with scope:
            await engine.run(request("a", steps=8))
            finished.append("a")

    async def other() -> None:
        await engine.run(request("b", steps=8))
        finished.append("b")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(cancelled_one)
        await reached(fake, "a")
        tasks.start_soon(other)
        await reached(fake, "b")
        scope.cancel()
        with anyio.fail_after(HANG_S):  # the engine flags the job when its caller is cancelled
            while not engine.status().cancelling:
                await anyio.sleep(0.005)
        fake.holds["a"].set()  # "a" stops at its next step boundary; "b" is still held, untouched
        with anyio.fail_after(HANG_S):
            while engine.status().running_calls != 1:
                await anyio.sleep(0.005)
        assert not engine.status().cancelling, "the running call left is not the cancelled one"
        fake.holds["b"].set()
    assert finished == ["b"]
    steps = dict(zip([call.prompt for call in fake.calls], fake.steps_run, strict=True))
    assert steps == {"a": 1, "b": 8}, "a stopped at the first boundary after its cancel; b ran all its steps"
    status = engine.status()
    assert (status.completed, status.cancelled, status.running_calls) == (1, 1, 0)
    await engine.aclose()


async def test_past_the_generators_bound_a_call_waits_and_past_the_queue_it_is_refused() -> None:
    fake = held_fake(["a", "b", "c"], in_flight=2)
    engine = started(lambda: fake, max_queue=1)
    done: list[str] = []

    async def one(prompt: str) -> None:
        await engine.run(request(prompt))
        done.append(prompt)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(one, "a")
        await reached(fake, "a")
        tasks.start_soon(one, "b")
        await reached(fake, "b")
        tasks.start_soon(one, "c")
        with anyio.fail_after(HANG_S):
            while engine.status().queue_depth != 1:
                await anyio.sleep(0.005)
        assert [call.prompt for call in fake.calls] == ["a", "b"], "c waits: the generator takes two"
        # two running + one queued = max_queue + max_in_flight: a fourth is refused at once, counted right
        with pytest.raises(EngineBusyError) as refused, anyio.fail_after(HANG_S):
            await engine.run(request("d"))
        assert str(refused.value) == busy_message("1 calls are queued and 2 are running", 1, None, 2)
        fake.holds["a"].set()
        await reached(fake, "c")  # a slot freed: the queued call starts
        starts = [prompt for event, prompt, _ in fake.log if event == "start"]
        assert starts == ["a", "b", "c"]
        assert fake.log.index(("end", "a", fake.log[0][2])) < fake.log.index(
            next(entry for entry in fake.log if entry[:2] == ("start", "c"))
        ), "c started only after a slot was freed"
        fake.holds["b"].set()
        fake.holds["c"].set()
    assert sorted(done) == ["a", "b", "c"] and fake.max_active == 2
    await engine.aclose()


async def test_calls_start_in_arrival_order_with_two_at_a_time() -> None:
    fake = FakeGenerator(max_in_flight=2, gate=threading.Event())
    engine = started(lambda: fake, max_queue=16)
    async with anyio.create_task_group() as tasks:
        for k in range(12):
            tasks.start_soon(engine.run, request(f"call {k}"))
            await anyio.sleep(0)  # submission order is the arrival order
        with anyio.fail_after(HANG_S):
            while engine.status().running_calls != 2:
                await anyio.sleep(0.005)
        assert engine.status().queue_depth == 10
        fake.gate.set()  # type: ignore[union-attr]
    assert [call.prompt for call in fake.calls] == [f"call {k}" for k in range(12)]
    assert fake.max_active == 2
    await engine.aclose()


async def test_a_local_model_runs_one_call_at_a_time_on_the_thread_that_loaded_it() -> None:
    fake = FakeGenerator(gate=threading.Event())  # max_in_flight 1, as a local model says by saying nothing
    loaded_on: list[str] = []

    def load() -> ImageGenerator:
        loaded_on.append(threading.current_thread().name)
        return fake

    engine = started(load, max_queue=3)
    async with anyio.create_task_group() as tasks:
        for k in range(4):
            tasks.start_soon(engine.run, request(f"call {k}"))
            await anyio.sleep(0)
        await anyio.to_thread.run_sync(fake.entered.wait, HANG_S)
        status = engine.status()
        assert (status.running_calls, status.queue_depth, status.max_in_flight) == (1, 3, 1)
        with pytest.raises(EngineBusyError, match=r"^busy: 3 calls are queued and one is running; "):
            await engine.run(request("refused"))  # 1 running + 3 queued: the queue's bound, as ever
        fake.gate.set()  # type: ignore[union-attr]
    assert fake.max_active == 1
    assert {thread for _, _, thread in fake.log} == set(loaded_on) == {"klein-engine"}
    await engine.aclose()


def test_what_a_generator_says_it_takes_at_once(tiny_pipeline: ImageGenerator) -> None:
    assert max_in_flight(tiny_pipeline) == 1, "the local model says nothing: one call at a time"
    assert max_in_flight(FakeGenerator(max_in_flight=3)) == 3
    for odd in (0, -2, True, 2.5, "4", None):
        assert max_in_flight(FakeGenerator(max_in_flight=odd)) == 1  # type: ignore[arg-type]


def test_the_wait_estimate_counts_the_calls_that_run_at_once() -> None:
    # 4 waiting behind 2 slots of 3 s calls: two rounds of the queue plus the running round = 3 x 3 s
    assert retry_after_s(4, 3.0, slots=2) == 9
    assert retry_after_s(4, 3.0) == 15  # one slot: five calls of 3 s, as before
    assert retry_after_s(3, None, slots=2) is None
