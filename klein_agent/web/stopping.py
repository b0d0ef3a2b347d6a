"""How `serve --http` and `gallery` stop on Ctrl-C or SIGTERM: promptly, quietly, with calls in flight cancelled.

uvicorn's own stop waits for every connection to close (a client's event stream stays open while it is
connected), logs the requests it then cancels as errors with tracebacks, and raises the signal again once
stopped, which surfaces as a KeyboardInterrupt inside the event loop's shutdown. Here the wait is bounded
(`STOP_GRACE_S`), the cancelling is told in one INFO line, and `serve` simply returns so that the caller closes
the engine and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn

log = logging.getLogger("klein_agent.http")

# After Ctrl-C or SIGTERM, how long calls in flight may still finish (whole seconds, as uvicorn takes it); then
# they are cancelled.
STOP_GRACE_S = 1


class StoppableServer(uvicorn.Server):
    """uvicorn's server, stopped by SIGINT or SIGTERM (a second SIGINT forces it) without raising them again."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to uvicorn's `handle_exit` while serving; restore the previous handlers."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def quiet_stop(record: logging.LogRecord) -> bool:
    """A logging filter for `uvicorn.error`: the requests cancelled by a stop someone asked for are not errors;
    uvicorn's warning that it cancels them becomes one INFO line of ours (`klein_agent.http`)."""
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False  # "Exception in ASGI application" for a request cancelled at the stop
    message = record.getMessage()
    if message.startswith("Cancel ") and "graceful shutdown" in message:
        count = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        log.info("stopping: %s open request(s) cancelled", count)  # under our name, at our level
        return False
    return True
