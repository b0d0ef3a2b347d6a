"""What stands in front of `serve --http` and `klein-agent gallery`: exact Host and Origin, a bearer token, sessions
bound to their token, and a deadline on slow request bodies. Pure ASGI, so it guards every route (the MCP endpoint
and the gallery).

Why each rule:
- Host and Origin are compared exactly (scheme, host and port), not by prefix: `Host: localhost:1.evil.com` and
  `Origin: http://localhost:8765.evil.com` are DNS-rebinding tricks that a prefix match lets through. Origins of
  other local ports (another web app on this machine) are refused unless listed with `--allow-origin`.
- Without a token any local process, or any web page through the browser, could drive the tools. Tokens are
  compared in constant time (`hmac.compare_digest`).
- A session id is a capability: it is bound to the token that created it, so another client cannot ride on it.
- Host names are case-insensitive (RFC 9110 section 4.2.3), so `LOCALHOST:8765` is `localhost:8765`; Origin
  schemes and hosts too. This guard is the one place Host and Origin are checked, for every route.
- The body is read here, before any app: within a size cap (`max_body_bytes`, 0 for GET and the other methods
  that take none), counted as it streams, spooled to disk beyond 1 MiB, and within a deadline, so a slow body
  cannot hold a connection forever (`klein_agent.web.bodies` says what the SDK's own body limit lacks). Slow
  *headers* are cut off by the server protocol (`klein_agent.web.protocol`).

What the libraries lack (mcp 2.3.0, Starlette 1.10), which is why this is ours:
- The SDK's `TransportSecurityMiddleware` runs inside the MCP transport only (not for the gallery), compares Host
  and Origin case-sensitively, and its `host:*` patterns match by prefix (`localhost:*` admits
  `localhost:1.evil.com`). Starlette's `TrustedHostMiddleware` compares the host name without its port, and its
  `CORSMiddleware` only adds headers: a request from another origin still reaches the app.
- The SDK's bearer check (`BearerAuthBackend`, `RequireAuthMiddleware`) is the OAuth 2.1 resource-server flow: a
  401 points the client at OAuth metadata, and there is no browser login for the gallery. The SDK binds a session
  to the credential that created it only for a user that flow authenticated (`scope["user"]`), so with a static
  token nothing would be bound without the binding here.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from klein_agent.web.bodies import BodyRefused, body_cap, declared_length, read_body, too_large

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSION_HEADER = b"mcp-session-id"
UNAUTHORIZED = -32001  # JSON-RPC server-defined range; the HTTP status says the rest


@dataclass
class GuardSettings:
    """What the guard accepts. `tokens` empty means no authentication (`--no-auth`, loopback only)."""

    allowed_hosts: Collection[str]  # exact `host:port` values, lower case
    allowed_origins: Collection[str]  # exact `scheme://host:port` values, lower case
    tokens: Collection[str] = ()
    cookie_name: str | None = None  # a cookie that may carry a token (for browsers, see the gallery)
    cookie_paths: tuple[str, ...] = ()  # path prefixes where the cookie is accepted (read-only pages)
    login_path: str = "/login"  # GET login_path?key=<login_key> sets the cookie, once
    login_key: str | None = None
    login_redirect: str = "/"
    body_timeout_s: float = 30.0
    max_body_bytes: int = 0  # the most a POST, PUT or PATCH body may hold; other methods take none
    max_sessions: int = 10_000
    cookie_tokens: dict[str, str] = field(
        default_factory=dict
    )  # cookie value -> token, minted by the login link
    where: str = (
        ""  # a sentence a 401 ends with: what is served where (`/mcp`, `/gallery/`), for a lost visitor
    )
    # where a client finds the token, for a 401 (`web.listen.token_hint`)
    token_hint: str = "the file the server named at start, or $KLEIN_AGENT_TOKEN"


class HttpGuard:
    """ASGI middleware that answers 421 (Host), 403 (Origin), 401 (token) or 404 (foreign session) itself,
    with a JSON-RPC error body, and passes everything else to `app`."""

    def __init__(self, app: ASGIApp, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings
        self._hosts = {h.lower() for h in settings.allowed_hosts}
        self._origins = {o.lower() for o in settings.allowed_origins}
        self._tokens = [t.encode() for t in settings.tokens]
        # session id -> digest of the token that created it; bounded, oldest forgotten first
        self._sessions: OrderedDict[str, bytes] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check one request; refuse it here or pass it on with a body deadline and session binding."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        page = b"text/html" in headers.get(b"accept", b"")  # a browser: say it in a page, not in JSON-RPC
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if host not in self._hosts:
            await _refuse(
                send,
                421,
                f"Host {host!r} is not this server; connect to one of {sorted(self._hosts)}",
                page=page,
            )
            return
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1").lower() not in self._origins:
            await _refuse(
                send,
                403,
                f"Origin {origin.decode('latin-1')!r} may not call this server; start it with --allow-origin "
                "ORIGIN to allow a web page",
                page=page,
            )
            return
        if scope.get("path") == self.settings.login_path and self.settings.cookie_name is not None:
            await self._login(scope, send, page)
            return
        token = self._token(scope, headers)
        if self._tokens and token is None:
            where = f" {self.settings.where}" if self.settings.where else ""
            await _refuse(
                send,
                401,
                "this server needs a bearer token: send 'Authorization: Bearer <token>' (the token is in "
                f"{self.settings.token_hint}).{where}"
                if not page
                else "this page needs you to log in: open the one-time login link that the server printed when it "
                f"started (each link works once; restart the server for a new one).{where}",
                extra=[(b"www-authenticate", b'Bearer realm="klein-agent"')],
                page=page,
            )
            return
        digest = hashlib.sha256(token or b"").digest()
        session = headers.get(SESSION_HEADER)
        if session is not None:
            owner = self._sessions.get(session.decode("latin-1"))
            if owner is not None and not hmac.compare_digest(owner, digest):
                await _refuse(
                    send, 404, "unknown session: start a new session (initialize) with your own token"
                )
                return
        method, path = scope.get("method", "GET"), scope.get("path", "")
        cap = body_cap(method, self.settings.max_body_bytes)
        try:
            length = declared_length(headers)
            if length is not None and length > cap:
                raise too_large(method, path, cap)  # before a byte of it is read
            body = await read_body(
                receive, cap=cap, timeout_s=self.settings.body_timeout_s, method=method, path=path
            )
        except BodyRefused as refused:
            log.warning("%s %s refused (%d): %s", method, path, refused.status, refused)
            # the rest of the body is not read, so the connection cannot carry another request
            await _refuse(send, refused.status, str(refused), close=True, page=page)
            return
        if body is None:
            return  # the client left
        try:
            await self.app(scope, body.replay(receive), self._bind_sessions(send, digest))
        finally:
            body.close()

    async def _login(self, scope: Scope, send: Send, page: bool) -> None:
        """The one-time browser link: a right key sets a session cookie for the read-only pages and is spent."""
        query = dict(
            part.split("=", 1)
            for part in scope.get("query_string", b"").decode("latin-1").split("&")
            if "=" in part
        )
        key = self.settings.login_key
        if key is None or not hmac.compare_digest(query.get("key", "").encode(), key.encode()):
            await _refuse(
                send,
                401,
                "this login link is not valid (it works once): restart the server for a new one",
                page=page,
            )
            return
        self.settings.login_key = None  # spent
        value = secrets.token_urlsafe(32)
        self.settings.cookie_tokens[value] = self._tokens[0].decode() if self._tokens else ""
        cookie = f"{self.settings.cookie_name}={value}; Path=/; HttpOnly; SameSite=Strict"
        headers = [
            (b"location", self.settings.login_redirect.encode()),
            (b"set-cookie", cookie.encode()),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def _token(self, scope: Scope, headers: dict[bytes, bytes]) -> bytes | None:
        """The presented token if it is one of ours, else None."""
        offered: list[bytes] = []
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            offered.append(auth[7:].strip())
        path = scope.get("path", "")
        name = self.settings.cookie_name
        if name and any(path.startswith(p) for p in self.settings.cookie_paths):
            value = _cookie(headers.get(b"cookie", b""), name)
            if value is not None and value in self.settings.cookie_tokens:
                offered.append(self.settings.cookie_tokens[value].encode())
        for candidate in offered:
            for known in self._tokens:
                if hmac.compare_digest(candidate, known):
                    return known
        return None

    def _bind_sessions(self, send: Send, digest: bytes) -> Send:
        async def send_and_bind(message: Message) -> None:
            if message["type"] == "http.response.start":
                for key, value in message.get("headers", []):
                    if key.lower() == SESSION_HEADER:
                        self._sessions[value.decode("latin-1")] = digest
                        self._sessions.move_to_end(value.decode("latin-1"))
                        while len(self._sessions) > self.settings.max_sessions:
                            self._sessions.popitem(last=False)
            await send(message)

        return send_and_bind


def _headers(scope: Scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in scope.get("headers", []):
        out.setdefault(key.lower(), value)  # the first of repeated headers
    return out


def _cookie(header: bytes, name: str) -> str | None:
    for part in header.decode("latin-1").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


async def _refuse(
    send: Send,
    status: int,
    message: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    close: bool = False,
    page: bool = False,
) -> None:
    """Answer `status` with `message`: a JSON-RPC error body, or (`page`, for a browser) a small HTML page with the
    message escaped (it may quote a Host or Origin header)."""
    if page:
        body = (
            '<!doctype html><html lang="en"><meta charset="utf-8"><title>klein-agent</title>'
            f"<h1>{status}</h1><p>{html.escape(message)}</p></html>"
        ).encode()
        kind = b"text/html; charset=utf-8"
    else:
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": None,
                "error": {"code": UNAUTHORIZED if status == 401 else -32600, "message": message},
            }
        ).encode()
        kind = b"application/json"
    headers = [
        (b"content-type", kind),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
