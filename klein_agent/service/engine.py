"""The one worker that owns the model: load state, a first-in first-out queue, progress and cancellation.

One thread (`klein-engine`) loads the model and then runs every call, one at a time, in arrival order. Async
callers submit with `await engine.run(request, ...)` and get the pictures back; they wait on the event loop, never
on a pool thread, so many queued calls cost nothing. The engine only runs the model: storing is the caller's, off
this thread, so the next call starts while the last one's pictures are written. Progress goes back from the worker
to the caller's event loop with a blocking `anyio.from_thread.run`, so every notification is delivered before the
call returns and none after it. A caller that is cancelled sets its job's flag: a queued job leaves the queue at
once, a running one stops at the next step boundary (the pipeline's progress callback raises) and returns nothing.

No MCP imports here and no torch import: out-of-memory errors are recognised by class name and message.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import gc
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from klein_agent.rules.busy import GeneratorBusyError, busy_message, replica_state
from klein_agent.rules.requests import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    ImageGenerator,
    NonFiniteOutputError,
)
from klein_agent.rules.resolution import RequestError
from klein_agent.service.error_text import describe

log = logging.getLogger(__name__)


# progress(value, total, message) on the caller's event loop; values rise strictly during one call.
AsyncProgress = Callable[[float, float | None, str], Awaitable[None]]


class EngineState(enum.StrEnum):
    """The model's life: loading, then ready or failed; stopped after `close` (failed stays failed)."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineError(Exception):
    """A call the engine could not run; the message says why and what to do."""


class EngineBusyError(EngineError):
    """The running call plus `max_queue` waiting ones are already there; the message estimates the wait."""


class ModelLoadError(EngineError):
    """The model failed to load, so no call can run; the message carries the load error."""


class ModelOutOfMemoryError(EngineError):
    """The device ran out of memory on this call; the message names the call's size and what to reduce."""


class GenerationFailedError(EngineError):
    """The call failed in the model: non-finite output, a request it refused, or an unexpected error."""


class JobCancelled(EngineError):
    """Raised inside the worker to stop a cancelled call between steps; callers see their own cancellation."""


@dataclass(frozen=True)
class FinishedRun:
    """One finished call: the pictures and what they cost."""

    result: GenerationResult
    queued_ms: float  # from submission to the worker picking the job up (includes waiting for the model)
    model_ms: float  # wall time inside ImageGenerator.generate


@dataclass(frozen=True)
class EngineStatus:
    """A consistent snapshot of the engine, for server_status.

    `load_seconds` in s; `mean_model_ms` in ms, the mean model time of the completed calls.
    """

    state: EngineState
    error: str | None  # the load error when state is "failed"
    info: GeneratorInfo | None  # None until the model has loaded
    queue_depth: int  # calls waiting, not counting the running one
    running: bool
    cancelling: bool  # the running call was cancelled and stops at its next step
    max_queue: int
    completed: int
    failed: int
    cancelled: int
    load_seconds: float | None
    mean_model_ms: float | None
    cache_hits: dict[str, int]  # summed over all calls: {"prompt": n, "references": n}


# Heartbeats between real reports: each adds this to the last real value, up to HEARTBEAT_SPAN above it, so values
# keep rising (as MCP requires) and stay below the next real one (real values are whole units, 1 apart).
HEARTBEAT_STEP = 1e-4
HEARTBEAT_SPAN = 0.5  # 5,000 heartbeats: close to 3 hours of one unit at the default 2 s


@dataclass(eq=False)
class _Job:
    request: GenerationRequest | None  # None while the place's inputs are still being prepared
    progress: AsyncProgress | None
    token: anyio.lowlevel.EventLoopToken
    done: anyio.Event
    lock: anyio.Lock
    loop_thread: int = field(default_factory=threading.get_ident)  # created on the caller's loop thread
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    started_at: float | None = None  # time.monotonic() when the worker took it
    # run by the worker before the model; gives the request to run (see QueuePlace.run)
    finalize: Callable[[GeneratorInfo, GenerationRequest], GenerationRequest] | None = None
    last_progress: float = -1.0  # the last value sent, heartbeats included
    real_progress: float = 0.0  # the last value the generator reported (0 before its first report)
    real_message: str = ""
    real_total: float | None = None
    reported: bool = False  # the generator has reported at least once
    beats: int = 0  # heartbeats since the last real report
    sent_at: float = field(default_factory=time.monotonic)  # when the last notification went out
    real_at: float | None = None  # when the generator last reported
    value: FinishedRun | None = None
    error: BaseException | None = None

    async def send(self, value: float, total: float | None, message: str) -> None:
        """Forward one report of the generator, on the caller's loop; drops anything not strictly above the
        last value sent."""
        if self.progress is None:
            return
        async with self.lock:
            self.real_progress, self.real_total, self.real_message = value, total, message
            self.reported, self.beats, self.real_at = True, 0, time.monotonic()
            if value <= self.last_progress:
                return
            self.last_progress, self.sent_at = value, time.monotonic()
            await self.progress(value, total, message)

    async def beat(self, message: str) -> None:
        """A heartbeat: the last real value (0 before the first) plus a little, with `message`, so a client that
        resets its timeout on progress keeps waiting through a long unit (loading, encoding, one decode)."""
        if self.progress is None:
            return
        async with self.lock:
            if self.beats * HEARTBEAT_STEP >= HEARTBEAT_SPAN:
                return
            # before any report the first beat is 0 itself; after one, the first beat is just above it
            value = self.real_progress + (self.beats + int(self.reported)) * HEARTBEAT_STEP
            self.beats += 1
            if value <= self.last_progress:
                return
            self.last_progress, self.sent_at = value, time.monotonic()
            await self.progress(value, self.real_total, message)


def _still_working(job: _Job) -> str:
    """A heartbeat's message: how long the running call has gone since its last report, and what that was."""
    now = time.monotonic()
    if job.real_at is None:
        return f"running, {now - (job.started_at or now):.0f} s in"
    return f"still working, {now - job.real_at:.0f} s after: {job.real_message}"


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

    def __init__(self, engine: Engine, job: _Job) -> None:
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
    """Owns one ImageGenerator on one thread; `run` queues a call and waits for it."""

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
        self._queue: collections.deque[_Job] = collections.deque()
        self._running: _Job | None = None
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
            self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new calls, fail queued ones, stop the running one at its next step, and join the worker."""
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        for job in queued:
            job.error = EngineError("the server is shutting down; the call was not run")
            self._signal_done(job)
        # A load cannot be interrupted, and the thread is a daemon: leave it. A running call stops at its next step.
        loading = self._state == EngineState.LOADING
        if self._thread is not None and self._thread is not threading.current_thread() and not loading:
            self._thread.join(timeout)
        with self._cond:
            self._state = EngineState.STOPPED if self._state != EngineState.FAILED else self._state

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
                running=self._running is not None,
                cancelling=self._running is not None and self._running.cancelled.is_set(),
                max_queue=self.max_queue,
                completed=done,
                failed=self._failed,
                cancelled=self._cancelled,
                load_seconds=self._load_seconds,
                mean_model_ms=(self._model_ms_total / done) if done else None,
                cache_hits=dict(self._cache_hits),
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
        job = _Job(
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
        self, job: _Job, request: GenerationRequest, progress: AsyncProgress | None
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

    def _enqueue(self, job: _Job) -> int:
        with self._cond:
            if self._stopping:
                raise EngineError("the server is shutting down; the call was not run")
            if self._state == EngineState.FAILED:
                raise ModelLoadError(f"the model failed to load, so no image can be made: {self._error}")
            # Capacity: the running call plus max_queue waiting ones (while loading, the first waiter will run).
            if len(self._queue) + (1 if self._running is not None else 0) >= self.max_queue + 1:
                raise EngineBusyError(self._busy_message())
            if self._thread is None:
                raise EngineError("the engine was not started")
            ahead = len(self._queue) + (1 if self._running is not None else 0)
            self._queue.append(job)
            self._cond.notify_all()
            return ahead

    def _mean_call_s(self) -> float | None:
        """The mean model time of the calls finished so far (s), None before the first."""
        done = self._completed
        return (self._model_ms_total / done / 1000) if done else None

    def _busy_message(self) -> str:
        if self._running is not None:
            state = f"{len(self._queue)} calls are queued and one is running"
        else:
            state = f"the model is still loading and {len(self._queue)} calls are waiting for it"
        return busy_message(state, len(self._queue), self._mean_call_s())

    async def _wait(self, job: _Job, ahead: int) -> None:
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
                    await job.beat(_still_working(job))
                    quiet = 0.0
                wait = max(self._heartbeat_s - quiet, self._heartbeat_s / 20)  # wake when a beat is due
            with anyio.move_on_after(wait):
                await job.done.wait()
            ahead = self._position(job)

    def _position(self, job: _Job) -> int:
        with self._cond:
            try:
                return self._queue.index(job) + (1 if self._running is not None else 0)
            except ValueError:
                return 0

    def _withdraw(self, job: _Job) -> None:
        job.cancelled.set()
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
        while True:
            with self._cond:
                # first in, first out: a reserved place at the head is waited for, not overtaken
                while not self._stopping and (not self._queue or self._queue[0].request is None):
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running = job
                job.started = True
                job.started_at = time.monotonic()
            try:
                self._execute(generator, job)
            finally:
                with self._cond:
                    self._running = None
                self._signal_done(job)

    def _execute(self, generator: ImageGenerator, job: _Job) -> None:
        assert job.request is not None
        request = job.request
        queued_ms = (time.perf_counter() - job.submitted) * 1000

        def on_step(done: int, total: int, message: str) -> None:
            if job.cancelled.is_set():
                raise JobCancelled("cancelled")
            if job.progress is not None:
                try:
                    anyio.from_thread.run(job.send, float(done), float(total), message, token=job.token)
                except Exception as exc:  # the caller's loop is gone: nobody waits for this result
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
                message = busy_message(replica_state(exc.queued), exc.queued, self._mean_call_s())
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

    def _signal_done(self, job: _Job) -> None:
        if threading.get_ident() == job.loop_thread:
            job.done.set()
            return
        with contextlib.suppress(Exception):  # the caller's loop has finished: nobody is waiting
            anyio.from_thread.run_sync(job.done.set, token=job.token)
