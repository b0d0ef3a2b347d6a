"""The worker that owns the model: load state, a first-in first-out queue, progress and cancellation.

One thread (`klein-engine`) loads the model and then runs every call, one at a time, in arrival order. A generator
that takes several calls at once (`rules.requests.max_in_flight`: a pool of replicas, never a local model) gets
that many: more worker threads (`klein-engine-N`) start the next calls, still in arrival order, as soon as the
generator has room, each call with its own progress, cancellation and accounting. A local model keeps exactly one
thread, the one that loaded it, since its caches and compiled graphs are not thread-safe. Async
callers submit with `await engine.run(request, ...)` and get the pictures back; they wait on the event loop, never
on a pool thread, so many queued calls cost nothing. The engine only runs the model: storing is the caller's, off
this thread, so the next call starts while the last one's pictures are written. Progress goes back from the worker
to the caller's event loop with a blocking `anyio.from_thread.run`, so every notification is delivered before the
call returns and none after it. A caller that is cancelled sets its job's flag and drops the notification it was
being sent (a client that stopped reading never holds the worker): a queued job leaves the queue at once, a running
one stops at the next step boundary (the pipeline's progress callback raises) and returns nothing.

No MCP imports here and no torch import: out-of-memory errors are recognised by class name and message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import gc
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from klein_agent.rules.busy import GeneratorBusyError, busy_message, queue_state, replica_state
from klein_agent.rules.requests import (
    GenerationRequest,
    GeneratorInfo,
    ImageGenerator,
    NonFiniteOutputError,
    max_in_flight,
)
from klein_agent.rules.resolution import RequestError
from klein_agent.service.engine_jobs import HEARTBEAT_SPAN as HEARTBEAT_SPAN  # tests read it here
from klein_agent.service.engine_jobs import AsyncProgress, FinishedRun, Job, still_working
from klein_agent.service.error_text import describe

log = logging.getLogger(__name__)


class EngineState(enum.StrEnum):
    """The model's life: loading, then ready or failed; stopped after `close` (failed stays failed)."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineError(Exception):
    """A call the engine could not run; the message says why and what to do."""


class EngineBusyError(EngineError):
    """The running calls plus `max_queue` waiting ones are already there; the message estimates the wait."""


class ModelLoadError(EngineError):
    """The model failed to load, so no call can run; the message carries the load error."""


class ModelOutOfMemoryError(EngineError):
    """The device ran out of memory on this call; the message names the call's size and what to reduce."""


class GenerationFailedError(EngineError):
    """The call failed in the model: non-finite output, a request it refused, or an unexpected error."""


class JobCancelled(EngineError):
    """Raised inside the worker to stop a cancelled call between steps; callers see their own cancellation."""


@dataclass(frozen=True)
class EngineStatus:
    """A consistent snapshot of the engine, for server_status.

    `load_seconds` in s; `mean_model_ms` in ms, the mean model time of the completed calls.
    """

    state: EngineState
    error: str | None  # the load error when state is "failed"
    info: GeneratorInfo | None  # None until the model has loaded
    queue_depth: int  # calls waiting, not counting the running ones
    running: bool  # at least one call is running
    cancelling: bool  # a running call was cancelled and stops at its next step
    max_queue: int
    completed: int
    failed: int
    cancelled: int
    load_seconds: float | None
    mean_model_ms: float | None
    cache_hits: dict[str, int]  # summed over all calls: {"prompt": n, "references": n}
    running_calls: int = 0  # calls running now: at most max_in_flight
    max_in_flight: int = 1  # calls the generator takes at once (1 for a local model, and while loading)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, torch.OutOfMemoryError, MPS/CPU allocator RuntimeErrors, MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")  # only if the pipeline already imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class QueuePlace:
    """A reserved place in the engine's queue (`Engine.reserve`); `run` fills it and waits for the pictures."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self._engine = engine
        self._job = job

    async def run(
        self,
        request: GenerationRequest,
        *,
        progress: AsyncProgress | None = None,
        finalize: Callable[[GeneratorInfo, GenerationRequest], GenerationRequest] | None = None,
    ) -> FinishedRun:
        """Run `request` in this place of the queue; as `Engine.run`. A place runs once.

        `finalize(info, request)` runs on the worker with the loaded model's info just before the model, for rules
        that depend on the model (the device's pixel budget, say) when the call arrived while it was loading; the
        request it returns is the one run, and whatever it raises fails the call (a RequestError as
        GenerationFailedError with its message)."""
        if self._job.request is not None:
            raise RuntimeError("a queue place runs one request")
        self._job.finalize = finalize
        return await self._engine._run_reserved(self._job, request, progress)


class Engine:
    """Owns one ImageGenerator, on one thread or (when it takes several calls at once) one per call it takes;
    `run` queues a call and waits for it."""

    def __init__(
        self,
        factory: Callable[[], ImageGenerator],
        *,
        max_queue: int = 8,
        heartbeat_s: float = 2.0,
    ) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self._factory = factory
        self.max_queue = max_queue
        self._heartbeat_s = heartbeat_s
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []  # in the order they started
        # the loading thread first; more only for a generator with max_in_flight > 1
        self._workers: list[threading.Thread] = []
        self._state = EngineState.LOADING
        self._error: str | None = None
        self._generator: ImageGenerator | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._load_seconds: float | None = None
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._model_ms_total = 0.0
        self._cache_hits: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading the model in the background; returns at once. Calling it again does nothing."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._main, name="klein-engine", daemon=True)
            self._workers.append(self._thread)
            self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new calls, fail queued ones, stop the running ones at their next step, and join the workers
        (`timeout` s for all of them together)."""
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = list(self._running)
            for job in running:
                job.cancelled.set()
            workers = list(self._workers)
            self._cond.notify_all()
        for job in running:  # a worker held by a notification in flight is let go (on the caller's loop)
            self._post(job, job.abandon)
        for job in queued:
            job.error = EngineError("the server is shutting down; the call was not run")
            self._signal_done(job)
        # A load cannot be interrupted, and the thread is a daemon: leave it. A running call stops at its next step.
        loading = self._state == EngineState.LOADING
        if not loading:
            deadline = None if timeout is None else time.monotonic() + timeout
            for worker in workers:
                if worker is not threading.current_thread():
                    worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._state = EngineState.STOPPED if self._state != EngineState.FAILED else self._state
        stop = getattr(self._generator, "stop_following", None)  # a RayGenerator's thread that polls the app
        if callable(stop):
            stop()

    async def aclose(self, timeout: float | None = 30.0) -> None:
        """`close` from async code: joins the worker on a pool thread so the loop can still serve its last progress."""
        await anyio.to_thread.run_sync(self.close, timeout)

    @property
    def state(self) -> EngineState:
        """Where the model is in its life: loading, ready, failed or stopped."""
        return self._state

    @property
    def info(self) -> GeneratorInfo | None:
        """The loaded model's description; None until it has loaded."""
        generator = self._generator
        return None if generator is None else generator.info

    def status(self) -> EngineStatus:
        """The state, queue and counters, read together under the engine's lock."""
        with self._cond:
            done = self._completed
            return EngineStatus(
                state=self._state,
                error=self._error,
                info=self.info,
                queue_depth=len(self._queue),
                running=bool(self._running),
                cancelling=any(job.cancelled.is_set() for job in self._running),
                max_queue=self.max_queue,
                completed=done,
                failed=self._failed,
                cancelled=self._cancelled,
                load_seconds=self._load_seconds,
                mean_model_ms=(self._model_ms_total / done) if done else None,
                cache_hits=dict(self._cache_hits),
                running_calls=len(self._running),
                max_in_flight=self._slots(),
            )

    def wait_loaded(self, timeout: float | None = None) -> EngineState:
        """Block (a plain thread, not the event loop) until the model has loaded or failed; for scripts and tests."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._state == EngineState.LOADING:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._state

    # -- submitting ------------------------------------------------------------------------------------------

    async def run(self, request: GenerationRequest, *, progress: AsyncProgress | None = None) -> FinishedRun:
        """Queue one call and return its pictures once the model has made them.

        Raises EngineBusyError at once when the queue is full, ModelLoadError when the model failed to load,
        ModelOutOfMemoryError or GenerationFailedError. If the awaiting task is cancelled the job is withdrawn
        (queued) or stopped at the next step (running), and nothing is returned.
        """
        async with self.reserve() as place:
            return await place.run(request, progress=progress)

    @contextlib.asynccontextmanager
    async def reserve(self) -> AsyncIterator[QueuePlace]:
        """Take a place in the queue now, in arrival order, for a request still being prepared.

        A caller reserves before it decodes its inputs: a full queue refuses it (EngineBusyError) before any
        work, and calls keep the order in which they arrived however long each one's decoding takes. The worker
        waits for the place at the head of the queue to be filled (`QueuePlace.run`); leaving the block without
        running gives the place up.
        """
        job = Job(
            request=None,
            progress=None,
            token=anyio.lowlevel.current_token(),
            done=anyio.Event(),
            lock=anyio.Lock(),
        )
        self._enqueue(job)
        place = QueuePlace(self, job)
        try:
            yield place
        finally:
            if job.request is None:
                self._withdraw(job)

    async def _run_reserved(
        self, job: Job, request: GenerationRequest, progress: AsyncProgress | None
    ) -> FinishedRun:
        with self._cond:
            job.request = request
            job.progress = progress
            self._cond.notify_all()
        ahead = self._position(job)
        try:
            await self._wait(job, ahead)
        except BaseException:
            self._withdraw(job)
            # A running job stops within one step; wait for it so nothing of it outlives this call.
            with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                await job.done.wait()
            raise
        if job.error is not None:
            raise job.error
        assert job.value is not None
        return job.value

    def _enqueue(self, job: Job) -> int:
        with self._cond:
            if self._stopping:
                raise EngineError("the server is shutting down; the call was not run")
            if self._state == EngineState.FAILED:
                raise ModelLoadError(f"the model failed to load, so no image can be made: {self._error}")
            # Capacity: as many running calls as the generator takes at once plus max_queue waiting ones (while
            # loading, one: the first waiter will run).
            if len(self._queue) + len(self._running) >= self.max_queue + self._slots():
                raise EngineBusyError(self._busy_message())
            if self._thread is None:
                raise EngineError("the engine was not started")
            ahead = len(self._queue) + len(self._running)
            self._queue.append(job)
            self._cond.notify_all()
            return ahead

    def _mean_call_s(self) -> float | None:
        """The mean model time of the calls finished so far (s), None before the first."""
        done = self._completed
        return (self._model_ms_total / done / 1000) if done else None

    def _slots(self) -> int:
        """How many calls may run at once: what the loaded generator takes (1 while loading). Under the lock."""
        generator = self._generator
        return 1 if generator is None else max_in_flight(generator)

    def _busy_message(self) -> str:
        if self._running:
            state = queue_state(len(self._queue), len(self._running))
        else:
            state = f"the model is still loading and {len(self._queue)} calls are waiting for it"
        return busy_message(state, len(self._queue), self._mean_call_s(), self._slots())

    async def _wait(self, job: Job, ahead: int) -> None:
        """Wait for the job, never silent for more than about `heartbeat_s`: while it waits, where it is (loading,
        queued, starting); while it runs, a heartbeat whenever the generator has said nothing for `heartbeat_s`
        (one long unit: loading weights, encoding references, decoding a large picture)."""
        while not job.done.is_set():
            wait = self._heartbeat_s
            if not job.started:
                if self._state == EngineState.LOADING:
                    message = "loading model"
                elif ahead:
                    message = f"queued: {ahead} call{'s' if ahead != 1 else ''} ahead"
                else:
                    message = "starting"
                await job.beat(message)
            else:
                quiet = time.monotonic() - job.sent_at
                if quiet >= self._heartbeat_s * 0.95:
                    await job.beat(still_working(job))
                    quiet = 0.0
                wait = max(self._heartbeat_s - quiet, self._heartbeat_s / 20)  # wake when a beat is due
            with anyio.move_on_after(wait):
                await job.done.wait()
            ahead = self._position(job)

    def _position(self, job: Job) -> int:
        with self._cond:
            try:
                return self._queue.index(job) + len(self._running)
            except ValueError:
                return 0

    def _withdraw(self, job: Job) -> None:
        job.abandon()  # a notification in flight is dropped: the worker must not wait on a caller that left
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # running or finished: the worker sees the flag and signals done
            if job.request is not None:
                self._cancelled += 1
            self._cond.notify_all()  # the next place may now be at the head
        job.error = JobCancelled("cancelled while queued")
        job.done.set()  # we are on the caller's loop here

    # -- the worker ------------------------------------------------------------------------------------------

    def _main(self) -> None:
        started = time.perf_counter()
        try:
            generator = self._factory()
        except BaseException as exc:  # a failed load must never kill the server
            if isinstance(
                exc, ValueError | OSError
            ):  # a model not cached, a bad folder: the message says what to do
                log.error("the model failed to load: %s", exc)
            else:
                log.exception("the model failed to load")
            with self._cond:
                self._state = EngineState.FAILED
                self._error = describe(exc)
                failed = list(self._queue)
                self._queue.clear()
                self._cond.notify_all()
            for job in failed:
                job.error = ModelLoadError(
                    f"the model failed to load, so no image can be made: {self._error}"
                )
                self._signal_done(job)
            return
        with self._cond:
            self._generator = generator
            self._load_seconds = time.perf_counter() - started
            if not self._stopping:
                self._state = EngineState.READY
            self._cond.notify_all()
        log.info("model ready in %.1f s: %s", self._load_seconds, generator.info.summary())
        self._work(generator)

    def _work(self, generator: ImageGenerator) -> None:
        """One worker's loop: take the call at the head of the queue whenever the generator has room for one more,
        run it, repeat until the engine stops. With room for several, the first worker to take a call starts the
        next worker, so there is always one waiting while the generator has room (never more threads than the
        most calls it took at once)."""
        while True:
            with self._cond:
                # first in, first out: a reserved place at the head is waited for, not overtaken
                while not self._stopping and (
                    not self._queue or self._queue[0].request is None or len(self._running) >= self._slots()
                ):
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running.append(job)
                job.started = True
                job.started_at = time.monotonic()
                if len(self._running) < self._slots() and len(self._workers) <= len(self._running):
                    worker = threading.Thread(
                        target=self._work,
                        args=(generator,),
                        name=f"klein-engine-{len(self._workers)}",
                        daemon=True,
                    )
                    self._workers.append(worker)
                    worker.start()
            try:
                self._execute(generator, job)
            finally:
                with self._cond:
                    self._running.remove(job)
                    self._cond.notify_all()  # a slot is free: a waiting worker may start the next call
                self._signal_done(job)

    def _execute(self, generator: ImageGenerator, job: Job) -> None:
        assert job.request is not None
        request = job.request
        queued_ms = (time.perf_counter() - job.submitted) * 1000

        def on_step(done: int, total: int, message: str) -> None:
            if job.cancelled.is_set():
                raise JobCancelled("cancelled")
            if job.progress is not None:
                try:
                    anyio.from_thread.run(job.send, float(done), float(total), message, token=job.token)
                except BaseException as exc:  # the caller's loop ended or cancelled the send
                    # (asyncio's CancelledError is no Exception): nobody waits for this result
                    job.cancelled.set()
                    raise JobCancelled("the caller went away") from exc
            if job.cancelled.is_set():
                raise JobCancelled("cancelled")

        t0 = time.perf_counter()
        try:
            if job.cancelled.is_set():
                raise JobCancelled("cancelled before start")
            if job.finalize is not None:
                request = job.finalize(generator.info, request)
            result = generator.generate(request, on_step)
            if job.cancelled.is_set():
                raise JobCancelled("cancelled after the last step")
        except JobCancelled as exc:
            with self._cond:
                self._cancelled += 1
            job.error = exc
            return
        except (
            GeneratorBusyError
        ) as exc:  # the replicas' queue is full: the local queue's refusal, same words
            with self._cond:
                message = busy_message(
                    replica_state(exc.queued), exc.queued, self._mean_call_s(), self._slots()
                )
            log.warning("%s", message)
            job.error = EngineBusyError(message)
            return
        except Exception as exc:
            with self._cond:
                self._failed += 1
            job.error = self._map_failure(request, exc)
            return
        model_ms = (time.perf_counter() - t0) * 1000
        with self._cond:
            self._completed += 1
            self._model_ms_total += model_ms
            for key, hits in result.cache_hits.items():
                self._cache_hits[key] = self._cache_hits.get(key, 0) + int(hits)
        job.value = FinishedRun(result=result, queued_ms=queued_ms, model_ms=model_ms)

    @staticmethod
    def _map_failure(request: GenerationRequest, exc: Exception) -> EngineError:
        if is_out_of_memory(exc):
            log.warning("out of memory: %s", exc)
            _free_accelerator_memory()
            refs = f" with {len(request.references)} reference(s)" if request.references else ""
            return ModelOutOfMemoryError(
                f"out of memory making {request.num_images} image(s) of {request.width}x{request.height}{refs}; "
                "try a smaller size, fewer images per call or fewer references"
            )
        if isinstance(exc, EngineError):
            return exc
        if isinstance(exc, NonFiniteOutputError | RequestError):  # expected outcomes with their own advice
            log.warning("generation refused: %s", exc)
            return GenerationFailedError(str(exc))
        log.exception("generation failed")
        return GenerationFailedError(
            f"the model failed on this call: {describe(exc)} (the server log has the details)"
        )

    def _signal_done(self, job: Job) -> None:
        self._on_loop(job, job.done.set)

    @staticmethod
    def _post(job: Job, action: Callable[[], None]) -> None:
        """Schedule `action` on the job's caller's event loop (directly when already there) without waiting for it:
        `close` keeps its timeout even when that loop exists but is not running (between runs, in teardown), where
        a waiting call would block until it ran again."""
        if threading.get_ident() == job.loop_thread:
            action()
            return
        loop = job.token.native_token  # asyncio's loop: the servers and the CLI run on asyncio
        if isinstance(loop, asyncio.AbstractEventLoop):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(action)

    @staticmethod
    def _on_loop(job: Job, action: Callable[[], None]) -> None:
        """Run `action` on the job's caller's event loop (directly when already there), and wait for it."""
        if threading.get_ident() == job.loop_thread:
            action()
            return
        # the caller's loop has finished or is cancelling (CancelledError is no Exception): nobody is waiting
        with contextlib.suppress(Exception, asyncio.CancelledError):
            anyio.from_thread.run_sync(action, token=job.token)
