"""`serve --http`: the plan (the bound socket, who may connect, and how), the MCP endpoint and the gallery behind
the guard, and running them.

Order matters: the socket is bound before anything is created (a port in use is reported with nothing else done),
the log line that names the URL is written once the socket listens, and every request passes the guard
(`klein_agent.web.guard`) before it reaches the MCP endpoint or the gallery. Binding, tokens and the Host and
Origin values live in `klein_agent.web.listen`, shared with `klein-agent gallery`.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass, field

import anyio
from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from klein_agent.service.studio import Studio
from klein_agent.web.guard import ASGIApp, GuardSettings, HttpGuard
from klein_agent.web.listen import COOKIE_NAME, LOGIN_PATH, LOOPBACK, bearer_line, host_port, serve_app

log = logging.getLogger("klein_agent.serve")


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
    token_hint: str = GuardSettings.token_hint  # where a 401 says the token is (`web.listen.token_hint`)
    login_key: str | None = None  # one-time key of the browser login link
    client_timeout_s: float = 30.0  # for a request's headers, and again for its body
    extra_routes: list[tuple[str, ASGIApp]] = field(default_factory=list)  # (path prefix, app): the gallery

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. `http://127.0.0.1:8765`."""
        return f"http://{host_port(self.host, self.port)}"


def http_app(mcp: MCPServer[Studio], studio: Studio, plan: HttpPlan) -> ASGIApp:
    """The MCP endpoint at /mcp (and any extra routes) behind the guard.

    The request body limit fits the largest inline image the input policy accepts (base64 is 4/3 of the bytes);
    the guard enforces it as the body streams in, before the SDK reads it. Host and Origin are checked by the
    guard alone (one rule for every route, host names in any case), so the SDK's own exact-case check is off.
    """
    body = math.ceil(studio.policy.max_bytes * 4 / 3) + 2**20
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = mcp.streamable_http_app(host=plan.host, transport_security=security, max_request_body_size=body)
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    where = served_where(plan)

    async def root(request: object) -> PlainTextResponse:
        return PlainTextResponse(f"klein-agent: {where}\n")

    app.router.routes.append(Route("/", root, methods=["GET"]))  # behind the guard: a visitor who got in
    for prefix, sub in plan.extra_routes:
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
        max_body_bytes=body,
        where=where,
        token_hint=plan.token_hint,
    )
    return HttpGuard(app, settings)


def served_where(plan: HttpPlan) -> str:
    """What this server serves where, for someone who opened `/`: the MCP endpoint, and the gallery if mounted."""
    text = f"MCP clients connect to {plan.url}/mcp"
    for prefix, _ in plan.extra_routes:
        text += f"; people see the image store at {plan.url}{prefix}/"
        if plan.login_key:
            text += " (open the one-time login link the server printed at start)"
    return text + "."


async def serve_http(mcp: MCPServer[Studio], studio: Studio, plan: HttpPlan) -> None:
    """Run uvicorn on the bound socket until cancelled; log the URL once the socket accepts connections."""

    def started() -> None:
        log.info("serving MCP over streamable HTTP at %s/mcp", plan.url)
        if plan.tokens:
            log.info("%s", bearer_line(plan.token_source))
        if plan.extra_routes and plan.login_key:
            log.info(
                "to see the gallery in a browser, open %s%s?key=%s (works once)",
                plan.url,
                LOGIN_PATH,
                plan.login_key,
            )
        elif plan.extra_routes:
            log.info("the gallery is at %s%s/", plan.url, plan.extra_routes[0][0])
        if plan.host not in LOOPBACK:
            log.warning("bound to %s, not a loopback address: keep the token secret", plan.host)
        if not plan.tokens:
            log.warning("--no-auth: any local process and any web page you visit can use the tools")

    try:
        await serve_app(
            http_app(mcp, studio, plan), plan.sock, header_timeout_s=plan.client_timeout_s, on_started=started
        )
    finally:
        # Stop the call in flight while this loop still runs: its worker may be delivering a notification here,
        # which the engine drops; once the loop has ended that delivery could only fail (and be logged as such).
        with anyio.CancelScope(shield=True):
            await studio.engine.aclose(timeout=5)
