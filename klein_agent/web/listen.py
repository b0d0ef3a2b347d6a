"""Listening for HTTP without MCP: the address and port, the bearer token, the exact Host and Origin values, and
running uvicorn on a socket that is already bound.

Used by `serve --http` (the MCP endpoint and the gallery) and `klein-agent gallery` (the gallery alone), so both
listen, authenticate and log the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import anyio

from klein_agent.web.connections import MIN_CONNECTIONS, BoundedListener, ConnectionBook, descriptor_budget
from klein_agent.web.guard import ASGIApp
from klein_agent.web.protocol import GuardedH11Protocol

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "KLEIN_AGENT_TOKEN"
LOGIN_PATH = "/login"
COOKIE_NAME = "klein_agent_session"


class HttpStartError(Exception):
    """The HTTP server cannot start as asked; the message names the option to change."""


def host_port(host: str, port: int) -> str:
    """`host:port` as it appears in a Host header and a URL (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (0: a free port). Raises HttpStartError naming --port or --host."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose
    # socket says TCP (`base_events._set_nodelay`). With it on, a response written as headers then body waited for
    # the client's delayed ACK: ~40 ms added to every call answered without a progress stream (measured, 256²).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


def load_tokens(token_file: Path, *, no_auth: bool, host: str) -> tuple[list[str], str]:
    """The accepted bearer tokens and where they came from.

    `$KLEIN_AGENT_TOKEN` if set (several, comma-separated, give each client its own); else `token_file` (the
    commands pass `option_types.store_locations(...).token_file`, beside the store), created with a fresh 256-bit token (mode 0600) if missing and kept across restarts (delete it to
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
    path = token_file
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


def bearer_line(source: str) -> str:
    """The start-up log line that tells clients and scripts how to authenticate, with `source` from `load_tokens`
    (where the token is: the file's path, or $KLEIN_AGENT_TOKEN). `serve --http` and `klein-agent gallery` log it."""
    return f"clients and scripts must send 'Authorization: Bearer <token>'; the token is in {source}"


def token_hint(token_file: Path) -> str:
    """Where a visitor without the token finds it, for the guard's 401 (`GuardSettings.token_hint`): the token
    file by its name only (the answer goes to whoever reaches the port, so not the folder), or $KLEIN_AGENT_TOKEN."""
    return (
        f"the file {token_file.name} beside the store, whose path the server logged at start, or ${TOKEN_ENV}"
    )


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


async def serve_app(
    app: ASGIApp, sock: socket.socket, *, header_timeout_s: float, on_started: Callable[[], None]
) -> None:
    """Run uvicorn with `app` on the bound `sock` until cancelled, Ctrl-C or SIGTERM (`klein_agent.web.stopping`:
    calls in flight are cancelled after a short grace, and it returns); call `on_started` once
    the socket accepts connections (the log line that names the URL belongs there). Slow request headers are cut
    off after `header_timeout_s` (`klein_agent.web.protocol`); connections are bounded below the open-file limit
    (`klein_agent.web.connections`, said in one log line). `sock` is taken over (detached)."""
    import uvicorn

    from klein_agent.web.stopping import STOP_GRACE_S, StoppableServer, quiet_stop

    class Protocol(GuardedH11Protocol):
        pass

    budget = descriptor_budget()
    Protocol.header_timeout_s = header_timeout_s
    Protocol.book = ConnectionBook(budget.connections)
    log.info("%s", budget.sentence())
    if budget.limit - budget.reserved < MIN_CONNECTIONS:
        log.warning(
            "the open-file limit %d is too low for a server: raise it with `ulimit -n 1024`", budget.limit
        )
    listener = BoundedListener.around(sock, Protocol.book)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        http=Protocol,
        timeout_graceful_shutdown=STOP_GRACE_S,
    )
    server = StoppableServer(config)
    logging.getLogger("uvicorn.error").addFilter(quiet_stop)
    async with anyio.create_task_group() as tg:
        sockets: list[socket.socket] = [listener]
        tg.start_soon(server.serve, sockets)
        while not server.started:
            if server.should_exit:
                return
            await anyio.sleep(0.01)
        on_started()


def login_key() -> str:
    """A fresh key for the one-time browser login link (`GET /login?key=...`): 192 random bits."""
    return secrets.token_urlsafe(24)
