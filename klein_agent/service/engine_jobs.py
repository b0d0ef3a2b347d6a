"""A call inside the engine (engine.py): its job record, the progress it forwards to the caller's event loop, and
the heartbeats that keep a long unit from looking silent. No MCP and no torch imports."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from klein_agent.rules.requests import GenerationRequest, GenerationResult, GeneratorInfo

# progress(value, total, message) on the caller's event loop; values rise strictly during one call.
AsyncProgress = Callable[[float, float | None, str], Awaitable[None]]


@dataclass(frozen=True)
class FinishedRun:
    """One finished call: the pictures and what they cost."""

    result: GenerationResult
    queued_ms: float  # from submission to the worker picking the job up (includes waiting for the model)
    model_ms: float  # wall time inside ImageGenerator.generate


# Heartbeats between real reports: each adds this to the last real value, up to HEARTBEAT_SPAN above it, so values
# keep rising (as MCP requires) and stay below the next real one (real values are whole units, 1 apart).
HEARTBEAT_STEP = 1e-4
HEARTBEAT_SPAN = 0.5  # 5,000 heartbeats: close to 3 hours of one unit at the default 2 s


@dataclass(eq=False)
class Job:
    """One submitted call: its request, where its progress goes, its cancel flag, and how far it got."""

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
    # the notification being delivered now, if any (caller's loop): a caller that leaves cancels it, so the worker
    # waiting on it is never held by a client that stopped reading
    sending: anyio.CancelScope | None = None

    def abandon(self) -> None:
        """Give up the notification in flight, if any; on the caller's loop. The job's cancel flag is set first, so
        no later one starts."""
        self.cancelled.set()
        if self.sending is not None:
            self.sending.cancel()

    async def _deliver(self, value: float, total: float | None, message: str) -> None:
        """Send one notification under the job's lock, unless the job was cancelled (it is then dropped)."""
        assert self.progress is not None
        with anyio.CancelScope() as scope:
            if self.cancelled.is_set():
                return
            self.sending = scope
            try:
                await self.progress(value, total, message)
            finally:
                self.sending = None

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
            await self._deliver(value, total, message)

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
            await self._deliver(value, self.real_total, message)


def still_working(job: Job) -> str:
    """A heartbeat's message: how long the running call has gone since its last report, and what that was."""
    now = time.monotonic()
    if job.real_at is None:
        return f"running, {now - (job.started_at or now):.0f} s in"
    return f"still working, {now - job.real_at:.0f} s after: {job.real_message}"
