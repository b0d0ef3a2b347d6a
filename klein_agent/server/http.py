"""`serve --http`: binding, the bearer token, the guard in front of the app, and running uvicorn.

Order matters: the socket is bound before anything is created (a port in use is reported with nothing else done),
the log line that names the URL is written once the socket listens, and every request passes the guard
(`http_guard`) before it reaches the MCP endpoint.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from klein_agent.server.http_guard import ASGIApp, GuardSettings, HttpGuard
from klein_agent.server.http_protocol import GuardedH11Protocol
from klein_agent.service.studio import Studio

log = logging.getLogger("klein_agent.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "KLEIN_AGENT_TOKEN"
LOGIN_PATH = "/login"
COOKIE_NAME = "klein_agent_session"


class HttpStartError(Exception):
    """The HTTP server cannot start as asked; the message names the option to change."""


@dataclass
class HttpPlan:
    """Everything `serve --http` decided before serving: the bound socket, who may connect, and how."""

    sock: socket.socket
    host: str
    port: int
    allowed_hosts: list[str]
    allowed_origins: list[str]
    tokens: list[str]  # empty: no authentication (--no-auth, loopback only)
    token_source: str  # where the token came from, for the log (never the token itself)
    login_key: str | None = None  # one-time key of the browser login link
    client_timeout_s: float = 30.0  # for a request's headers, and again for its body
    extra_routes: list[tuple[str, ASGIApp]] = field(default_factory=list)  # (path prefix, app): the gallery

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. `http://127.0.0.1:8765`."""
        return f"http://{host_port(self.host, self.port)}"


def host_port(host: str, port: int) -> str:
    """`host:port` as it appears in a Host header and a URL (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (0: a free port). Raises HttpStartError naming --port or --host."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise HttpStartError(
                f"port {port} on {host} is already in use (another klein-agent or another program): stop it, or "
                "choose another port with --port (0 picks a free one)"
            ) from None
        raise HttpStartError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host and --port"
        ) from None
    return sock


def token_file_for(store_root: Path) -> Path:
    """The token file beside the store: `<store>.http-token` in the store's parent folder."""
    return store_root.parent / f"{store_root.name}.http-token"


def load_tokens(store_root: Path, *, no_auth: bool, host: str) -> tuple[list[str], str]:
    """The accepted bearer tokens and where they came from.

    `$KLEIN_AGENT_TOKEN` if set (several, comma-separated, give each client its own); else the token file beside
    the store, created with a fresh 256-bit token (mode 0600) if missing and kept across restarts (delete it to
    rotate). `no_auth` is allowed on a loopback address only. Raises HttpStartError.
    """
    if no_auth:
        if host not in LOOPBACK:
            raise HttpStartError(
                f"--no-auth is allowed only on a loopback address (127.0.0.1, ::1), not {host}: anyone who can reach "
                "the port could run the tools and write files"
            )
        return [], "none (--no-auth)"
    env = os.environ.get(TOKEN_ENV, "")
    if env.strip():
        tokens = [t.strip() for t in env.split(",") if t.strip()]
        if any(len(t) < 16 for t in tokens):
            raise HttpStartError(f"${TOKEN_ENV}: each token must be at least 16 characters")
        return tokens, f"${TOKEN_ENV}"
    path = token_file_for(store_root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return [_read_token_file(path)], f"file {path} (kept from an earlier start)"
    except OSError as exc:
        raise HttpStartError(f"cannot create the token file {path}: {exc.strerror or exc}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return [token], f"file {path} (created now)"


def _read_token_file(path: Path) -> str:
    try:
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise HttpStartError(f"{path} is not a regular file: delete it and start again")
        if os.name == "posix" and st.st_mode & 0o077:
            raise HttpStartError(f"{path} can be read by other users: run `chmod 600 {path}` or delete it")
        token = path.read_text().strip()
    except OSError as exc:
        raise HttpStartError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise HttpStartError(f"the token in {path} is too short: delete the file to make a new one")
    return token


def allowed_hosts(host: str, port: int, extra: list[str]) -> list[str]:
    """Exact Host values: the loopback names on a loopback bind; the bound address, this machine's own addresses
    and `extra` (`--allowed-host NAME[:PORT]`) otherwise."""
    names = set(LOOPBACK) if host in LOOPBACK else {host}
    if host in ("0.0.0.0", "::"):
        names.discard(host)
        names |= set(LOOPBACK) | _own_addresses()
    values = {host_port(n, port) for n in names}
    for item in extra:
        values.add(
            item if item.rsplit(":", 1)[-1].isdigit() and not item.endswith("]") else host_port(item, port)
        )
    return sorted(v.lower() for v in values)


def allowed_origins(hosts: list[str], extra: list[str]) -> list[str]:
    """Exact Origin values: this server's own (a page it serves, such as the gallery) and `extra`
    (`--allow-origin`)."""
    return sorted({f"http://{h}" for h in hosts} | {o.rstrip("/").lower() for o in extra})


def _own_addresses() -> set[str]:
    found: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]).split("%", 1)[0])
    except OSError:
        pass
    return found


def http_app(mcp: MCPServer[Studio], studio: Studio, plan: HttpPlan) -> ASGIApp:
    """The MCP endpoint at /mcp (and any extra routes) behind the guard.

    The request body limit fits the largest inline image the input policy accepts (base64 is 4/3 of the bytes).
    """
    body = math.ceil(studio.policy.max_bytes * 4 / 3) + 2**20
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=plan.allowed_hosts,
        allowed_origins=plan.allowed_origins,
    )
    app = mcp.streamable_http_app(host=plan.host, transport_security=security, max_request_body_size=body)
    for prefix, sub in plan.extra_routes:
        from starlette.routing import Mount

        app.router.routes.append(Mount(prefix, app=sub))
    settings = GuardSettings(
        allowed_hosts=plan.allowed_hosts,
        allowed_origins=plan.allowed_origins,
        tokens=plan.tokens,
        cookie_name=COOKIE_NAME,
        cookie_paths=tuple(prefix for prefix, _ in plan.extra_routes),
        login_path=LOGIN_PATH,
        login_key=plan.login_key,
        login_redirect=plan.extra_routes[0][0] + "/" if plan.extra_routes else "/",
        body_timeout_s=plan.client_timeout_s,
    )
    return HttpGuard(app, settings)


async def serve_http(mcp: MCPServer[Studio], studio: Studio, plan: HttpPlan) -> None:
    """Run uvicorn on the bound socket until cancelled; log the URL once the socket accepts connections."""
    import uvicorn

    from klein_agent.server.http_stop import STOP_GRACE_S, StoppableServer, quiet_stop

    class Protocol(GuardedH11Protocol):
        header_timeout_s = plan.client_timeout_s

    config = uvicorn.Config(
        http_app(mcp, studio, plan),
        log_config=None,
        access_log=False,
        lifespan="on",
        http=Protocol,
        timeout_graceful_shutdown=STOP_GRACE_S,
    )
    server = StoppableServer(config)
    logging.getLogger("uvicorn.error").addFilter(quiet_stop)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [plan.sock])
        while not server.started:
            if server.should_exit:
                return
            await anyio.sleep(0.01)
        log.info("serving MCP over streamable HTTP at %s/mcp", plan.url)
        if plan.tokens:
            log.info(
                "clients must send 'Authorization: Bearer <token>'; the token is in %s", plan.token_source
            )
        if plan.login_key and plan.extra_routes:
            log.info(
                "to see the gallery in a browser, open %s%s?key=%s (works once)",
                plan.url,
                LOGIN_PATH,
                plan.login_key,
            )
        if plan.host not in LOOPBACK:
            log.warning("bound to %s, not a loopback address: keep the token secret", plan.host)
        if not plan.tokens:
            log.warning("--no-auth: any local process and any web page you visit can use the tools")
