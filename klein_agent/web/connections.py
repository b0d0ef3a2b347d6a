"""How many connections `serve --http` and `gallery` hold at once, and which one goes when that is reached.

Every connection costs a file descriptor. Under the common `ulimit -n 1024`, a thousand idle sockets (no token
needed to open one) used to exhaust them: `accept()` then fails with EMFILE, asyncio logs a traceback per attempt
(its accept loop retries up to `backlog` times per wakeup, and schedules as many retries), real clients are locked
out and the store cannot open a file. Here:

- the bound is derived from RLIMIT_NOFILE at start, with descriptors kept back for the store (SQLite, its journal,
  PNGs, thumbnails), model files while they load, logs and the interpreter (`descriptor_budget`);
- the listening socket counts what it accepts (`BoundedListener.accept`, called by asyncio's accept loop): at the
  bound it waits a loop turn for connections just accepted to start, then closes the connection idle longest (no request in flight: between keep-alive requests, or one
  that never sent a request) and accepts the newcomer; when every connection is busy the newcomer gets a 503 and
  is closed at once, so the accept queue drains and nothing spins;
- should the descriptors run out anyway (something else used them), the accept loop is paused once for a second
  instead of failing up to `backlog` times per wakeup.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("klein_agent.http")

RESERVED_FDS_MIN = 64  # descriptors never given to connections: the store, model files, logs, the interpreter
RESERVED_FDS_SHARE = 8  # ... or 1/8 of the limit, whichever is more
MAX_CONNECTIONS = 4096  # even when the limit is higher (`ulimit -n unlimited`)
MIN_CONNECTIONS = 8  # below this the server could not serve a client and its gallery page
SHED_IN_FLIGHT_MAX = 16  # connections closed but not yet released; accepting waits a loop turn beyond this
START_GRACE_S = 1.0  # how long accepting waits at the bound for connections just accepted to start
EMFILE_PAUSE_S = 1.0  # how long accepting pauses when descriptors ran out anyway (asyncio's own retry delay)
_BUSY = b"klein-agent: every connection is busy; try again in a moment.\n"
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


@dataclass(frozen=True)
class DescriptorBudget:
    """The open-file limit in force (`limit`), the descriptors kept back from connections (`reserved`) and the
    most connections held at once (`connections`)."""

    limit: int
    reserved: int
    connections: int

    def sentence(self) -> str:
        """The start-up log line that tells the user which limit is in force and what it allows."""
        return (
            f"HTTP connections: at most {self.connections} at once (open-file limit {self.limit}, `ulimit -n`; "
            f"{self.reserved} kept for the store, model files and logs); at the bound the connection idle longest "
            "is closed first"
        )


def descriptor_budget(limit: int | None = None) -> DescriptorBudget:
    """The connection bound for the soft RLIMIT_NOFILE (or `limit`, a descriptor count): the limit less
    max(RESERVED_FDS_MIN, limit / RESERVED_FDS_SHARE), at least MIN_CONNECTIONS, at most MAX_CONNECTIONS."""
    if limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = soft if soft != resource.RLIM_INFINITY else 2**20
    reserved = max(RESERVED_FDS_MIN, limit // RESERVED_FDS_SHARE)
    return DescriptorBudget(limit, reserved, max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, limit - reserved)))


class Connection(Protocol):
    """What the book needs of a connection's protocol (`klein_agent.web.protocol.GuardedH11Protocol`)."""

    def is_idle(self) -> bool:
        """True when no request is in flight: between requests, or before the first one."""

    def shed(self) -> None:
        """Close the connection now (its descriptor is released on the loop's next turn)."""


class ConnectionBook:
    """The open connections, least recently active first, and the descriptors accepted but not yet released.

    Single-threaded: used from the event loop only (the accept loop and the protocols' callbacks).
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._open: OrderedDict[int, Connection] = OrderedDict()  # id(protocol) -> protocol
        self._accepted = 0  # accepted sockets whose protocol has not started yet
        self._shedding: set[int] = set()  # closed by us, descriptor not yet released
        self._last_admit = 0.0  # time.monotonic() of the last admission

    @property
    def held(self) -> int:
        """Descriptors held by connections: open, being shed, or accepted and not yet started."""
        return len(self._open) + len(self._shedding) + self._accepted

    def may_accept(self) -> bool:
        """False (accepting waits a loop turn) while too many shed connections still hold their descriptors, or
        while the book is at its bound with connections accepted whose protocol has not started: those are not
        busy, only not yet known, and once started the idle longest of them can be closed for a newcomer. Without
        this wait, asyncio's accept loop (up to `backlog` accepts per wakeup, before any protocol starts) filled
        the bound with not-yet-started connections and answered 503 to everyone else in the same wakeup, real
        clients included."""
        if len(self._shedding) >= SHED_IN_FLIGHT_MAX:
            return False
        at_bound = len(self._open) + self._accepted >= self.bound
        # Bounded wait: a connection whose protocol never starts (its transport failed to build) must not stop
        # accepting for good; past the grace the book sheds or refuses as usual.
        starting = self._accepted > 0 and time.monotonic() - self._last_admit < START_GRACE_S
        return not (at_bound and starting)

    def admit(self) -> bool:
        """Make room for one more connection: True if it may be accepted (room, or the connection idle longest
        was closed for it), False if every connection is busy."""
        self._last_admit = time.monotonic()
        if len(self._open) + self._accepted < self.bound:
            self._accepted += 1
            return True
        for key, connection in self._open.items():
            if connection.is_idle():
                del self._open[key]
                self._shedding.add(key)
                log.warning(
                    "%d connections open (the bound for this open-file limit): closed the one idle longest",
                    self.bound,
                )
                connection.shed()
                self._accepted += 1
                return True
        log.warning("all %d connections are busy: a new one was answered 503", self.bound)
        return False

    def started(self, connection: Connection) -> None:
        """An accepted connection's protocol has started."""
        self._accepted = max(0, self._accepted - 1)
        self._open[id(connection)] = connection

    def active(self, connection: Connection) -> None:
        """The connection did something (data arrived): it is now the most recently active."""
        key = id(connection)
        if key in self._open:
            self._open.move_to_end(key)

    def ended(self, connection: Connection) -> None:
        """The connection is gone and its descriptor released."""
        self._open.pop(id(connection), None)
        self._shedding.discard(id(connection))


class BoundedListener(socket.socket):
    """The listening socket, with `accept` (what asyncio's accept loop calls) bounded by a ConnectionBook."""

    book: ConnectionBook
    _paused_until = 0.0

    @classmethod
    def around(cls, sock: socket.socket, book: ConnectionBook) -> BoundedListener:
        """Take over the bound socket `sock` (it is detached and must not be used after)."""
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.book = book
        return listener

    def accept(self) -> tuple[socket.socket, object]:
        """The next connection the book admits. Raises BlockingIOError when there is none to take now (asyncio's
        loop then waits for the next wakeup), and EMFILE once per pause when descriptors ran out anyway."""
        now = time.monotonic()
        if now < self._paused_until or not self.book.may_accept():
            raise BlockingIOError(errno.EAGAIN, "accepting paused")
        while True:
            try:
                conn, address = super().accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # asyncio logs this one, removes the reader and retries in a second; until then its loop
                    # gets BlockingIOError instead of one more EMFILE (and one more retry) per iteration
                    self._paused_until = now + EMFILE_PAUSE_S
                raise
            if self.book.admit():
                return conn, address
            _refuse_busy(conn)


def _refuse_busy(conn: socket.socket) -> None:
    """Tell a connection that came while every other one is busy to try again, and close it now."""
    try:
        conn.setblocking(False)
        conn.send(BUSY_RESPONSE)  # a few bytes into an empty send buffer: does not block
    except OSError:
        pass
    finally:
        conn.close()
