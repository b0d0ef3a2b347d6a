"""`GET /` on `serve --http`: a visitor without the token is told where the MCP endpoint and the gallery are,
one with it gets the same note instead of a bare 404. The ASGI app in-process, behind its real guard."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from klein_agent.server.app import build_server
from klein_agent.server.http import HttpPlan, http_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def gallery(scope: Any, receive: Any, send: Any) -> None:  # stands in for the gallery's app
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"gallery"})


async def get(app: Any, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8765", **headers}.items()
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8765),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body.decode()


@pytest.mark.parametrize("with_gallery", [True, False])
async def test_the_root_says_where_the_endpoint_and_the_gallery_are(
    server_state: Any, with_gallery: bool
) -> None:
    with socket.socket() as sock:
        plan = HttpPlan(
            sock=sock,
            host="127.0.0.1",
            port=8765,
            allowed_hosts=["127.0.0.1:8765"],
            allowed_origins=["http://127.0.0.1:8765"],
            tokens=["secret-token"],
            token_source="a test",
            login_key="once" if with_gallery else None,
            extra_routes=[("/gallery", gallery)] if with_gallery else [],
        )
        app = http_app(build_server(server_state), server_state, plan)
        endpoint = "MCP clients connect to http://127.0.0.1:8765/mcp"
        shown = "people see the image store at http://127.0.0.1:8765/gallery/"

        status, headers, body = await get(app, "/", {"accept": "*/*"})
        message = json.loads(body)["error"]["message"]
        assert status == 401 and headers["content-type"] == "application/json"
        assert "Bearer" in message and endpoint in message and (shown in message) == with_gallery, message

        status, headers, body = await get(app, "/", {"accept": "text/html"})  # a browser: the page says it
        assert status == 401 and endpoint in body and (shown in body) == with_gallery and "login link" in body

        status, headers, body = await get(app, "/", {"authorization": "Bearer secret-token"})
        assert status == 200 and body.startswith("klein-agent: " + endpoint)
        assert (shown in body) == with_gallery
