"""`serve` over stdio, with our own boundary around the SDK's stdio transport.

What the SDK lacks (mcp 2.3.0, `mcp/server/stdio.py` and `shared/jsonrpc_dispatcher.py`), which is why this exists:
its transport reads stdin as UTF-8 with errors="replace", so a line that is not UTF-8 is passed on altered (U+FFFD
in place of the bad bytes, inside a prompt too); a line that fails JSON-RPC validation becomes an exception that
the server's dispatcher logs at debug level and drops (the client's observer hook, `on_stream_exception`, is not
set for a server), so the client waits for an answer that JSON-RPC 2.0 says must come; it writes a line of any
length; and its reader blocks in a worker thread on stdin, which a signal does not wake. It offers no hook for
any of these, so we sit in front of it with pipes:

- the input side answers what the SDK would drop in silence or alter — a line that is not UTF-8, not JSON (a lone
  UTF-16 surrogate included), or not a JSON-RPC message — with a JSON-RPC error (-32700 parse error, or -32600
  with the request's id), and passes every other line on;
- the output side copies the SDK's lines to the real stdout and writes those error answers between them, so two
  writers never interleave within a line; it also refuses to pass a line over `MAX_LINE_BYTES` (the TypeScript
  SDK drops the connection at 10 MiB) and answers with an error instead;
- Ctrl-C (SIGINT) and SIGTERM close the input pipe: the SDK sees end of input, cancels calls in flight and
  returns, at once — the SDK's own reader thread, blocked on a terminal, would otherwise wait for Enter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
from mcp.server import MCPServer
from mcp_types import jsonrpc_message_adapter

from klein_agent.rules import limits

log = logging.getLogger("klein_agent.serve")

MAX_LINE_BYTES = limits.MAX_MESSAGE_BYTES  # every message on the wire stays under this (clients drop 10 MiB)
_CHUNK = 1 << 16


def serve_stdio(mcp: MCPServer[Any], before_exit: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve `mcp` over this process's stdin and stdout until the client closes stdin or a signal arrives; then
    await `before_exit` (serve: closing the engine) while the event loop still runs."""

    async def run() -> None:
        try:
            await mcp.run_stdio_async()
        finally:
            if before_exit is not None:
                with anyio.CancelScope(shield=True):
                    await before_exit()

    with _guarded_std_streams() as stop:
        previous = {sig: signal.signal(sig, lambda *_: stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            anyio.run(run)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def _guarded_std_streams() -> Iterator[Any]:
    wire_in, wire_out = os.dup(0), os.dup(1)
    to_sdk_r, to_sdk_w = os.pipe()
    from_sdk_r, from_sdk_w = os.pipe()
    os.dup2(to_sdk_r, 0)
    os.dup2(from_sdk_w, 1)
    os.close(to_sdk_r)
    os.close(from_sdk_w)
    writing = threading.Lock()  # one writer per line on the real stdout
    feeding = threading.Lock()  # held while writing to the SDK's stdin, so it is never closed mid-write
    closed = threading.Event()
    finished = threading.Event()
    shut = [False]

    def close_feed() -> None:  # with `feeding` held
        if not shut[0]:
            shut[0] = True
            with contextlib.suppress(OSError):
                os.close(to_sdk_w)

    def stop() -> None:
        """End of input for the SDK. Idempotent, and safe in a signal handler: it never waits for the feeder
        (which then closes the pipe itself after its current write)."""
        closed.set()
        if feeding.acquire(blocking=False):
            try:
                close_feed()
            finally:
                feeding.release()

    def write_line(line: bytes) -> None:
        with writing:
            view = memoryview(line + b"\n")
            while view:
                view = view[os.write(wire_out, view) :]

    def feed() -> None:  # real stdin -> checks -> the SDK's stdin
        pending = b""
        try:
            while not closed.is_set():
                chunk = os.read(wire_in, _CHUNK)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    answer = _refusal(line)
                    if answer is not None:
                        write_line(answer)
                    elif line.strip():
                        with feeding:
                            if closed.is_set():
                                close_feed()
                                return
                            view = memoryview(line + b"\n")
                            while view:
                                view = view[os.write(to_sdk_w, view) :]
        except OSError:
            pass
        finally:
            closed.set()
            with feeding:
                close_feed()

    def forward() -> None:  # the SDK's stdout -> the real stdout, whole lines only
        pending = b""
        while True:
            # The SDK keeps a duplicate of its stdout open for good, so end of file never comes: once it has
            # returned (`finished`), what it wrote is drained and the forwarder ends.
            readable, _, _ = select.select([from_sdk_r], [], [], 0.05)
            if not readable:
                if finished.is_set():
                    break
                continue
            chunk = os.read(from_sdk_r, _CHUNK)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                write_line(line if len(line) < MAX_LINE_BYTES else _too_long(line))
        if pending:
            write_line(pending)

    threads = [threading.Thread(target=feed, name="stdio-in", daemon=True)]
    threads.append(threading.Thread(target=forward, name="stdio-out", daemon=True))
    for thread in threads:
        thread.start()
    try:
        yield stop
    finally:
        stop()
        finished.set()
        threads[1].join(timeout=5)
        os.dup2(wire_out, 1)
        os.dup2(wire_in, 0)
        os.close(wire_out)
        os.close(wire_in)
        os.close(from_sdk_r)


def _refusal(line: bytes) -> bytes | None:
    """The JSON-RPC error answer for a line the SDK cannot take, or None for a line it can."""
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return _error(None, -32700, "parse error: the message is not valid UTF-8")
    try:
        data = json.loads(text)
    except ValueError:
        return _error(None, -32700, "parse error: the message is not valid JSON")
    request_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        request_id = None
    if _has_lone_surrogate(data):
        return _error(
            request_id, -32700, "parse error: the message holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
        )
    try:
        jsonrpc_message_adapter.validate_json(line, by_name=False)
    except Exception:
        return _error(
            request_id, -32600, "invalid request: not a JSON-RPC 2.0 request, notification or response"
        )
    return None


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _too_long(line: bytes) -> bytes:
    """An oversized answer replaced by an error for the same request (clients drop lines of 10 MiB)."""
    request_id = None
    head = line[:200].decode("utf-8", "replace")
    with contextlib.suppress(ValueError, IndexError):
        marker = head.index('"id":') + 5
        token = head[marker:].split(",", 1)[0].split("}", 1)[0].strip()
        parsed = json.loads(token)
        request_id = parsed if isinstance(parsed, (str, int)) else None
    log.warning(
        "an answer of %d bytes was over the %d-byte line limit and was replaced by an error",
        len(line),
        MAX_LINE_BYTES,
    )
    return _error(
        request_id,
        -32603,
        f"the answer is {len(line) / 2**20:.1f} MiB, over the {MAX_LINE_BYTES // 2**20} MiB a stdio message may take: "
        "for a large image, use export_image to write it to a file instead of reading image://",
    )


def _error(request_id: str | int | None, code: int, message: str) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    ).encode()
