"""uvicorn's HTTP/1.1 protocol with a deadline on request headers, counted in the server's connection book.

A client that sends its request line and headers a byte at a time would otherwise hold its connection open for
as long as it likes: uvicorn arms no timer until a request is complete (its keep-alive timer runs only between
requests). Here a connection waiting for a request's headers is closed after `HEADER_TIMEOUT_S`. The body has its
own deadline in `klein_agent.web.guard`. Each connection is entered in the `ConnectionBook`
(`klein_agent.web.connections`), which closes the one idle longest when the server is at its bound.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from klein_agent.web.connections import ConnectionBook

HEADER_TIMEOUT_S = 10.0


class GuardedH11Protocol(H11Protocol):
    """H11Protocol that drops a connection whose request headers take longer than `header_timeout_s`."""

    header_timeout_s = HEADER_TIMEOUT_S
    book: ConnectionBook | None = None  # set per server (`klein_agent.web.listen.serve_app`)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the header clock as the connection opens."""
        super().connection_made(transport)
        if self.book is not None:
            self.book.started(self)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        """Stop the clock once a request's headers are in; start it when a new request begins."""
        if self.book is not None:
            self.book.active(self)
        super().data_received(data)
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the clock and the book entry with the connection."""
        self._stop_clock()
        if self.book is not None:
            self.book.ended(self)
        super().connection_lost(exc)

    def is_idle(self) -> bool:
        """No request in flight: before the first request's headers are complete, or between keep-alive
        requests."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def shed(self) -> None:
        """Close at once, dropping anything unsent (an idle connection has nothing the client waits for)."""
        self._stop_clock()
        self.transport.abort()

    def _watch_headers(self) -> None:
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)
        elif not waiting:
            self._stop_clock()

    def _stop_clock(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.logger.warning(
                "request headers not received within %.0f s: connection dropped", self.header_timeout_s
            )
            self.transport.close()
