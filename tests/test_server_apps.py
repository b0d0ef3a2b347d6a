"""The MCP App seen by MCP clients, in process on the tiny model (the view itself runs in Chromium in
tests/test_app_view.py): a client that advertises the Apps extension gets the view, its `_meta.ui` links and the
app-only tools; any other client lists, reads and calls exactly what it did before the view existed (the tool
snapshot of tests/test_server_tools.py holds for it, in both protocol eras)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp import Client
from mcp.client.extension import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID

from klein_agent.server.app import build_server
from klein_agent.server.apps import APP_ONLY, MAX_VIEW_BYTES, VIEW_URI, view_html
from tests.test_server_tools import SNAPSHOT, tool_listing

pytestmark = pytest.mark.anyio

IMAGE_TOOLS = ("generate", "edit", "compose", "inpaint", "view_image", "compare_images")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["auto", "legacy"])
async def apps_client(request: pytest.FixtureRequest, server_state: Any) -> Any:
    apps = advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})
    async with Client(build_server(server_state), mode=request.param, extensions=[apps]) as connected:
        yield connected


async def test_a_client_without_apps_sees_todays_tools_and_resources(client: Client) -> None:
    listing = tool_listing(await client.list_tools())
    assert listing == json.loads(SNAPSHOT.read_text(encoding="utf-8"))  # byte for byte what it listed before
    assert not any("ui" in (t.get("_meta") or {}) for t in listing)
    resources = (await client.list_resources()).resources
    assert not [r for r in resources if str(r.uri).startswith("ui://")]


async def test_a_client_without_apps_cannot_call_the_app_only_tools(client: Client) -> None:
    unknown = await client.call_tool("no_such_tool", {})
    for name in APP_ONLY:
        refused = await client.call_tool(name, {"image_id": "img_x", "verdict": "pick"})
        assert refused.is_error
        # the same answer as for a tool that does not exist
        assert refused.content[0].text == unknown.content[0].text.replace("no_such_tool", name)  # type: ignore[union-attr]


async def test_an_apps_client_gets_the_view_and_its_tools(apps_client: Client) -> None:
    tools = {t.name: t for t in (await apps_client.list_tools()).tools}
    for name in IMAGE_TOOLS:
        assert (tools[name].meta or {})["ui"] == {"resourceUri": VIEW_URI}, name
    for name in APP_ONLY:
        assert (tools[name].meta or {})["ui"] == {"resourceUri": VIEW_URI, "visibility": ["app"]}, name
    assert (tools["export_image"].meta or {})["ui"] == {"visibility": ["model"]}
    listed = [r for r in (await apps_client.list_resources()).resources if str(r.uri) == VIEW_URI]
    assert [r.mime_type for r in listed] == [APP_MIME_TYPE]
    [content] = (await apps_client.read_resource(VIEW_URI)).contents
    assert content.mime_type == APP_MIME_TYPE
    html = content.text  # type: ignore[union-attr]
    assert html == view_html() and "/*VIEW_JS*/" not in html and "{{SIZE_MULTIPLE}}" not in html
    assert len(html.encode()) <= MAX_VIEW_BYTES
    assert (content.meta or {})["ui"]["csp"] == {"connectDomains": [], "resourceDomains": []}  # no network
    for banned in ("fetch(", "XMLHttpRequest", "WebSocket", "http://", "https://", "<script src", "<link "):
        assert banned not in html, banned


async def test_app_image_and_app_verdict(apps_client: Client) -> None:
    made = await apps_client.call_tool("generate", {"prompt": "a fox", "seed": 1, "width": 64, "height": 64})
    [first] = made.structured_content["images"]  # type: ignore[index]
    edited = await apps_client.call_tool(
        "edit", {"image": first["image_id"], "prompt": "at night", "seed": 2}
    )
    [second] = edited.structured_content["images"]  # type: ignore[index]
    shown = await apps_client.call_tool("app_image", {"image_id": second["image_id"], "max_edge": 64})
    assert not shown.is_error, shown.content
    about = shown.structured_content
    assert about is not None and about["parents"] == [first["image_id"]]
    assert (about["tool"], about["prompt"], about["seed"], about["standing"]) == ("edit", "at night", 2, None)
    assert about["rerun"]["name"] == "edit" and about["rerun"]["arguments"]["image"] == first["image_id"]
    assert shown.content[0].type == "image"
    judged = await apps_client.call_tool("app_verdict", {"image_id": second["image_id"], "verdict": "reject"})
    assert judged.structured_content == {
        "image_id": second["image_id"],
        "verdict": "reject",
        "reason": "",
        "standing": "reject",
    }
    rejected = await apps_client.call_tool("list_images", {"standing": "reject"})
    assert [i["image_id"] for i in rejected.structured_content["images"]] == [second["image_id"]]  # type: ignore[index]
    missing = await apps_client.call_tool("app_image", {"image_id": "img_doesnotexist00"})
    assert missing.is_error and "img_doesnotexist00" in missing.content[0].text  # type: ignore[union-attr]
