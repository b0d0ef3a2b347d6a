"""A tiny S3 endpoint on 127.0.0.1 for the tests of `S3BlobStore`'s failure handling (tests/test_s3_put_failures.py):
just enough of the protocol for obstore (ListObjectsV2 of an empty-or-not bucket, create-only PUT with
If-None-Match, HEAD, GET), with faults scripted per PUT, so a test can make the server answer 503, answer late or
refuse the keys, and see what the client does. Real SeaweedFS runs in the contained tests (tests/store_servers.py);
this one exists because a real server cannot be told to fail on cue.

Faults, one per PUT in order (then every PUT is served normally):
    "store-then-503"   the object is stored, the answer is 503 (a response lost after the write landed)
    "503"              503 SlowDown, nothing stored
    "store-then-late"  the object is stored, the answer comes `late_s` seconds later (past the client's timeout)
    "403"              403 AccessDenied, nothing stored
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

BUCKET = "fake"


@dataclass
class FakeS3:
    """The server's state: objects by key (bucket-relative), the faults still to come, and every PUT seen."""

    endpoint: str = ""
    objects: dict[str, bytes] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    puts: list[str] = field(default_factory=list)  # what each PUT was answered: "201", "412", a fault's name
    late_s: float = 3.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    connections: list[socket.socket] = field(default_factory=list)

    def stop(self) -> None:
        """Stop listening: from now on a connection to `endpoint` is refused. Idempotent."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self.lock:  # and the client's kept-alive connections, or its next request would still be served
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


def _handler(state: FakeS3) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            with state.lock:
                state.connections.append(self.connection)

        def _key(self) -> str:
            path = urlsplit(self.path).path
            return path.removeprefix(f"/{BUCKET}").lstrip("/")

        def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _object_headers(self, data: bytes) -> dict[str, str]:
            return {
                "ETag": f'"{hashlib.md5(data).hexdigest()}"',  # S3 ETag of a single PUT
                "Last-Modified": formatdate(usegmt=True),
                "Content-Type": "application/octet-stream",
            }

        def do_PUT(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            key = self._key()
            with state.lock:
                fault = state.faults.pop(0) if state.faults else None
                stored = key in state.objects
                if fault in ("store-then-503", "store-then-late") and not stored:
                    state.objects[key] = data
                elif fault is None and self.headers.get("If-None-Match") == "*" and stored:
                    fault = "412"
                elif fault is None:
                    state.objects[key] = data
                state.puts.append(fault or "201")
            if fault in ("503", "store-then-503"):
                self._answer(503, b"<Error><Code>SlowDown</Code><Message>Please reduce</Message></Error>")
            elif fault == "403":
                self._answer(403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
            elif fault == "412":
                self._answer(412, b"<Error><Code>PreconditionFailed</Code></Error>")
            else:
                if fault == "store-then-late":
                    time.sleep(state.late_s)
                self._answer(200, headers={"ETag": self._object_headers(data)["ETag"]})

        def do_GET(self) -> None:
            key = self._key()
            if not key:  # ListObjectsV2 (the store's check at start, and inventory)
                with state.lock:
                    keys = sorted(state.objects)
                items = "".join(
                    f"<Contents><Key>{k}</Key><Size>{len(state.objects[k])}</Size>"
                    f"<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
                    for k in keys
                )
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?>'
                    '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    f"<Name>{BUCKET}</Name><Prefix></Prefix><KeyCount>{len(keys)}</KeyCount>"
                    f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{items}</ListBucketResult>"
                ).encode()
                self._answer(200, body, {"Content-Type": "application/xml"})
                return
            with state.lock:
                data = state.objects.get(key)
            if data is None:
                self._answer(404, b"<Error><Code>NoSuchKey</Code></Error>")
            else:
                self._answer(200, data, self._object_headers(data))

        def do_HEAD(self) -> None:
            with state.lock:
                data = state.objects.get(self._key())
            if data is None:
                self._answer(404)
            else:
                self.send_response(200)
                for name, value in self._object_headers(data).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

    return Handler


@contextlib.contextmanager
def fake_s3() -> Iterator[FakeS3]:
    """A running FakeS3 on a free port of 127.0.0.1 (`.endpoint`, bucket BUCKET); stopped on exit."""
    state = FakeS3()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.endpoint, state.server = f"http://127.0.0.1:{server.server_port}", server
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        state.stop()
