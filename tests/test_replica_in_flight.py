"""A front-end follows the application's bound of calls at once (`RayGenerator.refresh_in_flight`,
`follow_in_flight`): a redeploy with more replicas is used without restarting the front-end, one with fewer is
respected, and an application that cannot answer for a while keeps the bound in use, said once. A stand-in for
the Serve handle answers `in_flight` as a redeployed application would; the real method is asked on a cluster in
tests/test_replica_scaleout.py and in local mode in tests/test_replica.py."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from klein_agent.replica.handle import RayGenerator
from klein_agent.rules.requests import GenerationRequest
from klein_agent.service.engine import Engine, EngineState
from tests.fakes import FAKE_INFO


@dataclass
class Application:
    """What `handle.options(method_name="in_flight").remote().result()` answers: `bound`, or raises `failure`."""

    bound: int = 2
    failure: Exception | None = None
    asked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def options(self, **options: Any) -> Application:
        assert options == {"method_name": "in_flight"}, options
        return self

    def remote(self) -> Application:
        return self

    def result(self, timeout_s: float) -> int:
        with self.lock:
            self.asked += 1
            if self.failure is not None:
                raise self.failure
            return self.bound


def test_a_redeploy_with_more_or_fewer_replicas_is_followed(caplog: pytest.LogCaptureFixture) -> None:
    app = Application(bound=2)
    generator = RayGenerator(app, FAKE_INFO, max_in_flight=2)
    with caplog.at_level(logging.INFO, logger="klein_agent.replica"):
        assert generator.refresh_in_flight() == 2 and caplog.records == [], "no change, nothing said"
        app.bound = 4  # `deploy --replicas 4` over the same application
        assert generator.refresh_in_flight() == 4 and generator.max_in_flight == 4
        app.bound = 1
        assert generator.refresh_in_flight() == 1
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "the application now takes 4 calls at once (was 2): a front-end sends up to 4",
        "the application now takes 1 calls at once (was 4): a front-end sends up to 1",
    ]


def test_an_application_that_cannot_answer_keeps_the_bound_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Application(bound=3, failure=TimeoutError("the replicas are being replaced\nsecond line"))
    generator = RayGenerator(app, FAKE_INFO, max_in_flight=3)
    with caplog.at_level(logging.INFO, logger="klein_agent.replica"):
        for _ in range(5):
            assert generator.refresh_in_flight() == 3
        app.failure = None
        app.bound = 5
        assert generator.refresh_in_flight() == 5
        app.failure = RuntimeError("gone again")
        assert generator.refresh_in_flight() == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "could not ask the application how many calls it takes at once (TimeoutError: the replicas are being "
        "replaced); still sending up to 3",
        "could not ask the application how many calls it takes at once (RuntimeError: gone again); still sending "
        "up to 5",
    ], "once per failure streak, first line only"
    for odd in (0, -1, True, "4", None):
        app.failure, app.bound = None, odd  # type: ignore[assignment]
        assert generator.refresh_in_flight() == 5, f"{odd!r} is no bound"


def test_the_follower_asks_periodically_and_stops() -> None:
    app = Application(bound=2)
    generator = RayGenerator(app, FAKE_INFO, max_in_flight=2)
    generator.follow_in_flight(every_s=0.02)
    generator.follow_in_flight(every_s=0.02)  # idempotent: one thread
    app.bound = 6
    deadline = time.monotonic() + 30  # a hang guard; it follows within a few periods
    while generator.max_in_flight != 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generator.max_in_flight == 6
    assert len([t for t in threading.enumerate() if t.name == "klein-ray-in-flight"]) >= 1
    generator.stop_following()
    time.sleep(0.1)
    asked = app.asked
    time.sleep(0.2)
    assert app.asked == asked, "no question after stop_following"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_engine_runs_more_calls_at_once_after_the_bound_grows(anyio_backend: str) -> None:
    """The engine reads the bound whenever it starts a call: after a refresh from 1 to 2, the next calls overlap."""
    from tests.fakes import FakeGenerator

    app = Application(bound=1)
    fake = FakeGenerator(max_in_flight=1, holds={"a": threading.Event(), "b": threading.Event()})

    class Followed(RayGenerator):
        def generate(self, request: GenerationRequest, progress: Any = None) -> Any:
            return fake.generate(request, progress)

    generator = Followed(app, FAKE_INFO, max_in_flight=1)
    engine = Engine(lambda: generator, max_queue=4)
    engine.start()
    assert engine.wait_loaded(30) == EngineState.READY
    assert engine.status().max_in_flight == 1
    app.bound = 2
    await anyio.to_thread.run_sync(generator.refresh_in_flight)
    assert engine.status().max_in_flight == 2
    async with anyio.create_task_group() as tg:
        for prompt in ("a", "b"):
            tg.start_soon(engine.run, GenerationRequest(prompt, 64, 64, seed=1, steps=2))
        with anyio.fail_after(30):  # both held inside the generator at once: they overlap
            while not all(fake.reached.get(p) and fake.reached[p].is_set() for p in ("a", "b")):
                await anyio.sleep(0.01)
        assert engine.status().running_calls == 2
        for hold in fake.holds.values():
            hold.set()
    assert fake.max_active == 2
    await engine.aclose()


def test_closing_the_engine_stops_the_follower() -> None:
    app = Application(bound=2)
    generator = RayGenerator(app, FAKE_INFO, max_in_flight=2)
    generator.follow_in_flight(every_s=0.02)
    engine = Engine(lambda: generator)
    engine.start()
    assert engine.wait_loaded(30) == EngineState.READY
    deadline = time.monotonic() + 30  # a hang guard: the follower asks within a few periods
    while app.asked < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.close()
    time.sleep(0.1)
    asked = app.asked
    time.sleep(0.2)
    assert app.asked == asked, "the follower outlived the engine"
