"""The Ray Serve deployment that holds one model: the only module of the scale-out mode that loads the pipeline.

A replica loads the model the deploy options name (`model_options.generator_factory`, as `serve` does) and runs
one call at a time (`max_ongoing_requests=1`). `generate` is an async generator, as Ray's cancellation needs: the
model runs on a one-thread pool (the replica's engine thread), progress comes back to the event loop with
`call_soon_threadsafe` and is streamed out, and a caller's `response.cancel()` arrives here as CancelledError at
the `await`, which sets a flag the progress callback checks, so the model stops at the next step boundary, as a
cancelled local call does. A sync method would not be interrupted at all (docs/scaling.md, the notes' §1.3). A
per-call deadline, checked at the same boundary, frees a replica whose front-end died: Ray does not cancel the
calls of a caller that is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from klein_agent.logs import forward_ours
from klein_agent.model_options import generator_factory
from klein_agent.replica import wire
from klein_agent.replica.config import (
    MODEL_OPTION_NAMES,
    deployment_options,
    in_flight_bound,
    placement_from_args,
)
from klein_agent.rules import limits
from klein_agent.rules.requests import GenerationRequest, GeneratorInfo

log = logging.getLogger("klein_agent.replica")
# The logger Serve writes each replica's log file with (logs/serve/replica_*.log): Ray's SERVE_LOGGER_NAME, a
# private constant (ray/serve/_private/constants.py), hence named again here.
SERVE_LOGGER = "ray.serve"


class _Stopped(Exception):
    """Raised in the progress callback to stop the model at a step boundary (a cancel or the deadline)."""


class KleinReplica:
    """One model behind Ray Serve. `options`: the model options by name (MODEL_OPTION_NAMES), as `deploy` parsed
    them. Loading raises what `serve` would log for the same options (ValueError naming the option, or the
    loader's error); Serve then reports the deployment unhealthy and `deploy` prints it. `in_flight`: how many calls
    one front-end may send the application at once (`config.in_flight_bound` of the placement it was deployed
    with), which each front-end asks once it connects."""

    def __init__(self, options: dict[str, Any], in_flight: int = 1) -> None:
        if _in_own_worker():
            # Our lines (the model's load, a call stopped or failed) go to the replica's own log file, beside
            # Serve's access lines and with the same request ids; without this their INFO lines went nowhere.
            forward_ours(logging.getLogger(SERVE_LOGGER))
        self._in_flight = in_flight
        self._generator = generator_factory(argparse.Namespace(**options), skip_bad_loras=True)()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="klein-replica")
        self.calls = 0  # calls started here, for tests and logs
        self.stopped = 0  # calls stopped at a step boundary (cancelled or past the deadline)
        log.info("replica ready: %s", self._generator.info.summary())

    def info(self) -> GeneratorInfo:
        """What the front-end's engine and resolution rules need to know of the model."""
        return self._generator.info

    def in_flight(self) -> int:
        """How many calls a front-end may send this application at once (its replicas x one call each)."""
        return self._in_flight

    def counts(self) -> dict[str, int]:
        """{"calls": started, "stopped": stopped at a step boundary}, for tests and status."""
        return {"calls": self.calls, "stopped": self.stopped}

    async def generate(
        self, request: GenerationRequest, deadline_s: float = limits.REPLICA_DEADLINE_S
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Run `request`, streaming wire events: ("progress", done, total, message) per unit, then ("result",
        GenerationResult) or ("error", kind, message). Stops at the next step boundary when the caller cancels
        or after `deadline_s` seconds."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()
        stop = threading.Event()
        deadline = time.monotonic() + deadline_s
        self.calls += 1
        reached = (0, 0)  # the last step boundary the model reported: (done, total)

        def progress(done: int, total: int, message: str) -> None:
            nonlocal reached
            reached = (done, total)
            if stop.is_set():
                raise _Stopped("cancelled by the caller")
            if time.monotonic() > deadline:
                raise wire.ReplicaDeadlineError(
                    f"the call ran longer than the replica's deadline of {deadline_s:g} s and was stopped at step "
                    f"{done}/{total}; ask for fewer steps, a smaller size or fewer images"
                )
            loop.call_soon_threadsafe(events.put_nowait, (wire.PROGRESS, done, total, message))

        future = loop.run_in_executor(self._pool, self._generator.generate, request, progress)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        try:
            while (event := await events.get()) is not None:
                yield event
            try:
                result = await future
            except Exception as exc:  # the model's failure goes to the caller as an event, its traceback here
                if isinstance(exc, wire.ReplicaDeadlineError):
                    self.stopped += 1
                log.warning(
                    "call %s failed on the replica: %s",
                    wire.call_name(request),
                    exc,
                    exc_info=not isinstance(exc, ValueError),
                    extra={"repeat_key": request.call_id},  # every failed call named, not one and a count
                )
                yield wire.error_event(exc)
                return
            yield (wire.RESULT, result)
        except (asyncio.CancelledError, GeneratorExit):
            stop.set()  # the thread stops at its next step; the slot is free only then
            # counted and said when the model ends, even if a second cancel ends this wait first
            future.add_done_callback(lambda ended: self._ended_cancelled(request, ended, reached))
            with contextlib.suppress(Exception):
                await asyncio.shield(future)
            raise

    def _ended_cancelled(
        self, request: GenerationRequest, ended: asyncio.Future[Any], reached: tuple[int, int]
    ) -> None:
        """Count and log the end of a call its caller cancelled, once its model thread is done with it. Each call's
        line is its own kind for the repeat filter (`repeat_key`), so every cancelled call is named."""
        failure = None if ended.cancelled() else ended.exception()
        if isinstance(failure, _Stopped):
            log.info(
                "call %s: its caller cancelled it; stopped at step %d/%d",
                wire.call_name(request),
                *reached,
                extra={"repeat_key": request.call_id},
            )
            self.stopped += 1  # after the line: a test that sees the count finds the line
        else:
            log.info(
                "call %s: its caller cancelled it after it had ended; its result or failure is dropped",
                wire.call_name(request),
                extra={"repeat_key": request.call_id},
            )


def _in_own_worker() -> bool:
    """Whether this replica runs as a Ray actor in a worker process of its own, whose logging is ours to set; not
    in Serve's local testing mode, which runs it inside the caller's process (the caller's logging stays as it was).
    `is_initialized` comes first: asking the runtime context without it would start a local Ray instance."""
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def build_app(options: dict[str, Any], **placement: Any) -> Application:
    """The Serve application of the model `options` names (MODEL_OPTION_NAMES; others are ignored), placed as
    `deployment_options(**placement)` says. Raises TypeError for an unknown placement name and Serve's
    ValueError for values it refuses (e.g. MIN > MAX)."""
    deployment = serve.deployment(name=limits.RAY_DEPLOYMENT)(KleinReplica)
    return deployment.options(**deployment_options(**placement)).bind(
        {name: options[name] for name in MODEL_OPTION_NAMES if name in options}, in_flight_bound(**placement)
    )


def app_from_args(args: dict[str, Any]) -> Application:
    """The application builder a Serve config names (`import_path: klein_agent.replica.deployment:app_from_args`,
    see `klein-agent deploy --print-config`): `args` is {"model": model options, "placement": deployment_options'
    keywords}, as that command prints them. Raises KeyError/TypeError for a malformed `args`."""
    model, placement = placement_from_args(args)
    return build_app(model, **placement)
