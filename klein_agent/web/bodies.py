"""Reading a request body before the app sees it: within a size cap and a deadline, in bounded memory.

Why here and not the library's: the MCP SDK's `RequestBodyLimitMiddleware` (mcp 2.3.0) checks Content-Length and
counts a streamed body, but it has no deadline (a body that trickles in holds the connection for good), keeps the
body in memory and copies it once more before handing it on (twice the cap at the peak), guards the MCP endpoint
only (not the gallery, nor a GET that carries a body) and answers a bare "Request body too large". Starlette and
uvicorn have no body cap at all. The guard reads first, so that
- a Content-Length over the cap is refused before a byte of the body is read;
- a chunked body is counted as it streams and refused at the first byte over the cap;
- a method that takes no body (GET, HEAD, DELETE, OPTIONS: nothing here gives one a meaning) has a cap of 0;
- what was read is spooled: in memory up to `SPOOL_MEMORY_BYTES`, on disk (a nameless temporary file) beyond, so a
  refused upload costs at most that much memory however large it was, and an accepted one is not held twice;
- a body that trickles (a byte a second) is cut off at the deadline.
"""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import IO, Any

import anyio

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # the methods whose body any route here may read
SPOOL_MEMORY_BYTES = 1024**2  # a body is kept in memory up to this, on disk beyond
REPLAY_CHUNK_BYTES = 256 * 1024  # the pieces the app receives a spooled body in


class BodyRefused(Exception):
    """The body cannot be taken: `status` (408 too slow, 413 too large) and a sentence saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Body:
    """A request body read whole: the spool holding its `size` bytes."""

    spool: IO[bytes]
    size: int

    def replay(self, receive: Receive) -> Receive:
        """A `receive` that gives the app this body in pieces, then whatever `receive` brings next. The spool is
        closed once the last piece is handed over."""
        self.spool.seek(0)
        left = self.size

        async def replayed() -> Message:
            nonlocal left
            if left >= 0 and not self.spool.closed:
                piece = self.spool.read(min(REPLAY_CHUNK_BYTES, left))
                left -= len(piece)
                more = left > 0
                if not more:
                    self.spool.close()
                    left = -1
                return {"type": "http.request", "body": piece, "more_body": more}
            return await receive()  # after the body: a disconnect, eventually

        return replayed

    def close(self) -> None:
        """Drop the bytes (a refused or abandoned request)."""
        self.spool.close()


def body_cap(method: str, max_body_bytes: int) -> int:
    """The most bytes a request with `method` may carry: `max_body_bytes` for POST, PUT and PATCH, else 0."""
    return max_body_bytes if method.upper() in BODY_METHODS else 0


def declared_length(headers: dict[bytes, bytes]) -> int | None:
    """The Content-Length the client announced, or None (chunked, or none). uvicorn's h11 has already refused a
    malformed one with 400."""
    value = headers.get(b"content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


def too_large(method: str, path: str, cap: int) -> BodyRefused:
    """The 413 for a body over `cap`, saying what this route takes."""
    if cap == 0:
        return BodyRefused(413, f"{method} {path} takes no request body: send the request without one")
    return BodyRefused(
        413,
        f"the request body is larger than this server takes ({cap / 1024**2:.1f} MiB): pass large images by path "
        "(--allow-dir) or URL (--allow-urls) instead of inline",
    )


async def read_body(receive: Receive, *, cap: int, timeout_s: float, method: str, path: str) -> Body | None:
    """Read the body of one request, counting as it streams. Returns it, or None if the client left.

    Raises BodyRefused(413) at the first byte over `cap` and BodyRefused(408) when the body has not arrived
    within `timeout_s` seconds; what was read is dropped either way.
    """
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115 - handed on in Body
    body = Body(spool=spool, size=0)  # type: ignore[arg-type]
    try:
        with anyio.move_on_after(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    body.close()
                    return None  # http.disconnect: nobody to answer
                chunk = message.get("body", b"")
                if body.size + len(chunk) > cap:
                    raise too_large(method, path, cap)
                spool.write(chunk)
                body.size += len(chunk)
                if not message.get("more_body", False):
                    return body
        raise BodyRefused(408, f"the request body did not arrive within {timeout_s:.0f} s")
    except BaseException:
        body.close()
        raise
