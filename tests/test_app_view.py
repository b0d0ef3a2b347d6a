"""The MCP App view in Chromium, inside the smallest faithful host (tests/app_host/: the official `AppBridge` from
@modelcontextprotocol/ext-apps, bundled by esbuild, and a sandbox proxy on a second origin served with the spec's
CSP as an HTTP header). Every request the host makes goes through `window.mcpRequest`, bound to the official
Python SDK client of a real `klein-agent serve --model tiny` over stdio, advertising the Apps extension.

The view renders a generate result; a painted mask becomes an inpaint call whose stored mask is the painted
region; a pick reaches the store and the model's context; a model-only tool is refused by the host; the view is at
most 200 KB; screenshots at desktop and phone width go to $KLEIN_AGENT_APP_SHOTS (else the test's folder).

Without Playwright, Chromium, Node or the host's node_modules (`npm ci --prefix tests/app_host`) the tests are
skipped, except where KLEIN_AGENT_REQUIRE_BROWSER is set (.ci/run sets it, so CI fails instead).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chromium  # tools/, on the path through conftest
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.extension import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID
from PIL import Image

from klein_agent.server.apps import MAX_VIEW_BYTES, VIEW_URI
from klein_agent.service.store import ImageStore
from tests.http_helpers import REPO, serve_args

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HOST = REPO / "tests" / "app_host"
# The spec's sandbox when a resource declares no domains (SEP-1865, "Content Security Policy"): our view declares none.
CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; media-src 'self' data:; connect-src 'none'"
)


def _why_not() -> str | None:
    missing = chromium.missing()
    if missing:
        return missing
    if shutil.which("npm") is None:
        return "no npm: install Node.js 20 to build the App test host"
    if not (HOST / "node_modules" / "@modelcontextprotocol" / "ext-apps").is_dir():
        return "the App test host is not installed: npm ci --prefix tests/app_host"
    built = subprocess.run(["npm", "run", "--silent", "build"], cwd=HOST, capture_output=True, text=True)
    if built.returncode != 0:
        return f"the App test host did not build: {built.stderr.strip() or built.stdout.strip()}"
    return None


_reason = _why_not()
if _reason and os.environ.get("KLEIN_AGENT_REQUIRE_BROWSER"):
    raise RuntimeError(f"KLEIN_AGENT_REQUIRE_BROWSER is set, but {_reason}")
if _reason:
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Hosted:
    """A host page with the view in it, the client behind it, and the store's folder."""

    page: Any
    client: Client
    store: Path

    def view(self) -> Any:
        """The view's frame: inside the sandbox proxy, inside the host's iframe."""
        return self.page.frame_locator("#view").frame_locator("iframe")

    async def log(self) -> list[dict[str, Any]]:
        """What the host saw: resource reads, the view's tool calls, context updates."""
        return await self.page.evaluate("window.hostLog")  # type: ignore[no-any-return]


def dumped(result: Any) -> dict[str, Any]:
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)  # type: ignore[no-any-return]


@asynccontextmanager
async def hosted(tmp_path: Path, width: int = 1000) -> AsyncIterator[Hosted]:
    """A real server over stdio, its Apps-advertising client, and the host page in Chromium at `width` px."""
    from playwright.async_api import async_playwright

    store = tmp_path / "store"
    server = StdioServerParameters(command=sys.executable, args=serve_args(store), cwd=REPO)
    apps = advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})
    async with Client(server, extensions=[apps]) as client, async_playwright() as playwright:

        async def mcp_request(method: str, params: dict[str, Any]) -> dict[str, Any]:
            if method == "tools/list":
                return dumped(await client.list_tools())
            if method == "tools/call":
                return dumped(await client.call_tool(params["name"], params.get("arguments") or {}))
            if method == "resources/read":
                return dumped(await client.read_resource(params["uri"]))
            raise ValueError(f"the test host forwards no {method}")

        browser = await chromium.launch(playwright)
        try:
            page = await browser.new_page(viewport={"width": width, "height": 900})
            await page.expose_function("mcpRequest", mcp_request)
            await page.route("http://host.test/**", _host_route)
            await page.route("http://sandbox.test/**", _sandbox_route)
            await page.goto("http://host.test/host.html")
            yield Hosted(page, client, store)
        finally:
            await browser.close()


async def _host_route(route: Any) -> None:
    name = route.request.url.rsplit("/", 1)[-1]
    files = {
        "host.html": (HOST / "host.html", "text/html"),
        "host.js": (HOST / "dist" / "host.js", "text/javascript"),
    }
    if name not in files:
        await route.fulfill(status=404, body="")
        return
    path, kind = files[name]
    await route.fulfill(status=200, body=path.read_bytes(), headers={"content-type": kind})


async def _sandbox_route(route: Any) -> None:
    if not route.request.url.endswith("/proxy.html"):
        await route.fulfill(status=404, body="")
        return
    body = (HOST / "proxy.html").read_bytes()
    await route.fulfill(
        status=200, body=body, headers={"content-type": "text/html", "content-security-policy": CSP}
    )


async def start(h: Hosted, tool: str, args: dict[str, Any]) -> None:
    await h.page.evaluate("([tool, args]) => window.startView(tool, args)", [tool, args])


async def shown_id(h: Hosted) -> str:
    return await h.view().locator("#main-img").get_attribute("data-id")  # type: ignore[no-any-return]


async def shown(h: Hosted) -> None:
    """Until the latest view has its picture's details from app_image (after the tool result's preview)."""
    await h.page.wait_for_function(
        "() => { const log = window.hostLog, i = log.map(e => e.kind).lastIndexOf('resource');"
        " return log.slice(i).some(e => e.name === 'app_image' && e.kind === 'result') }"
    )


async def settled(h: Hosted, timeout_s: float = 60) -> str:
    """The view's status line once the action it shows has ended (the buttons are enabled again)."""
    await h.view().locator("#pick:enabled").wait_for(timeout=timeout_s * 1000)
    return await h.view().locator("#status").inner_text()  # type: ignore[no-any-return]


def shots() -> Path | None:
    """Where screenshots go when they are to be kept and looked at ($KLEIN_AGENT_APP_SHOTS), else None."""
    folder = os.environ.get("KLEIN_AGENT_APP_SHOTS")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


@pytest.mark.parametrize(("width", "label"), [(1000, "desktop"), (390, "phone")])
async def test_the_view_renders_a_generate_result(tmp_path: Path, width: int, label: str) -> None:
    async with hosted(tmp_path, width) as h:
        await start(h, "generate", {"prompt": "a red fox in snow", "seed": 5, "width": 256, "height": 192})
        view = h.view()
        main = view.locator("#main-img")
        await main.wait_for(state="visible")
        await h.page.wait_for_function(
            "() => (window.hostLog || []).some(e => e.kind === 'result' && e.name === 'app_image')"
        )
        image_id = await shown_id(h)
        assert image_id.startswith("img_")
        src = await main.get_attribute("src")
        assert src is not None and src.startswith("data:image/")  # no network: a data: URI from the result
        natural = await main.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert natural == [256, 192]  # the picture decoded, at its size
        about = await view.locator("#about").inner_text()
        assert image_id in about and "256×192" in about and "seed 5" in about and "a red fox in snow" in about
        box = await main.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width  # no sideways overflow
        wide = await view.locator("body").evaluate(
            "b => { const w = document.documentElement.clientWidth; return [w, document.documentElement.scrollWidth,"
            " [...b.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > w + 0.5).map(e => e.id || e.tagName)] }"
        )
        assert wide[1] <= wide[0] and not wide[2], f"the view scrolls sideways at {width} px: {wide}"
        for button in ("#pick", "#reject", "#vary", "#compare-btn", "#paint-btn"):
            assert await view.locator(button).is_enabled()
        log = await h.log()
        [resource] = [e for e in log if e["kind"] == "resource"]
        assert (resource["uri"], resource["mimeType"]) == (VIEW_URI, APP_MIME_TYPE)
        # UTF-8 bytes of the whole document, as the host received it
        assert resource["bytes"] <= MAX_VIEW_BYTES
        folder = shots() or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        await h.page.screenshot(path=str(folder / f"view-{label}.png"), full_page=True)
        # compare against a second picture, then the slider, as a person would
        await start_vary_and_compare(h, folder, label)


async def start_vary_and_compare(h: Hosted, folder: Path, label: str) -> None:
    view = h.view()
    first = await shown_id(h)
    await view.locator("#vary").click()
    status = await settled(h)
    assert status.startswith("generate: made img_"), status
    second = await shown_id(h)
    calls = [e for e in await h.log() if e["kind"] == "call" and e["name"] == "generate"]
    # vary: the same call, a new seed
    assert second != first and calls and calls[-1]["arguments"]["seed"] != 5
    await view.locator("#compare-btn").click()
    a_src, b_src = [await view.locator(side).get_attribute("src") for side in ("#side-a", "#side-b")]
    assert a_src and b_src and a_src != b_src
    heights = []
    for _ in range(3):  # the frame follows the height the view reports: it must settle, not grow
        await h.page.wait_for_timeout(400)
        heights.append(await h.page.locator("#view").evaluate("f => f.getBoundingClientRect().height"))
    assert heights[1] == heights[2] and heights[2] < 2000, heights
    await h.page.screenshot(path=str(folder / f"view-{label}-compare.png"), full_page=True)
    await view.locator(".seg button[data-mode=slider]").click()
    await view.locator("#slide-range").fill("30")
    clip = await view.locator("#slide-a").evaluate("img => img.style.clipPath")
    assert clip == "inset(0px 70% 0px 0px)"


async def test_a_painted_mask_becomes_an_inpaint_call(tmp_path: Path) -> None:
    async with hosted(tmp_path) as h:
        await start(h, "generate", {"prompt": "a blue boat", "seed": 3, "width": 256, "height": 256})
        view = h.view()
        await shown(h)
        source = await shown_id(h)
        await view.locator("#paint-btn").click()
        canvas = view.locator("#paint-canvas")
        box = await canvas.bounding_box()
        assert box is not None
        await view.locator("#brush").fill("2")  # 2 tokens wide: a radius of 16 px
        # a stroke across the right half, at mid height
        mouse = h.page.mouse
        y = box["y"] + box["height"] * 0.5
        await mouse.move(box["x"] + box["width"] * 0.6, y)
        await mouse.down()
        for k in range(1, 11):
            await mouse.move(box["x"] + box["width"] * (0.6 + 0.03 * k), y)
        await mouse.up()
        await view.locator("#paint-prompt").fill("a yellow buoy")
        await h.page.screenshot(path=str((shots() or tmp_path) / "view-desktop-paint.png"), full_page=True)
        await view.locator("#repaint").click()
        status = await settled(h)
        assert status.startswith("inpaint: made img_"), status
        await view.locator("#strip button").nth(1).wait_for()
        made = await shown_id(h)
        assert made != source
        [call] = [e for e in await h.log() if e["kind"] == "call" and e["name"] == "inpaint"]
        assert call["arguments"]["image"] == source and call["arguments"]["prompt"] == "a yellow buoy"
        assert call["arguments"]["mask"].startswith("data:image/png;base64,")
        meta = (await h.client.read_resource(f"image://{made}/meta")).contents[0]
        recipe = json.loads(meta.text)["recipe"]  # type: ignore[union-attr]
        assert recipe["tool"] == "inpaint" and recipe["prompt"] == "a yellow buoy"
        mask_id = recipe["mask"]["image"]

        # compare_images' result opens the view on A/B: b (the inpaint) as A, a (its source) as B
        await start(h, "compare_images", {"a": source, "b": made})
        await shown(h)
        view = h.view()
        await view.locator("#compare:visible").wait_for()
        assert await view.locator("#b-select").input_value() == source
        assert await shown_id(h) == made
        a_src, b_src = [await view.locator(side).get_attribute("src") for side in ("#side-a", "#side-b")]
        assert a_src and b_src and a_src.startswith("data:image/") and a_src != b_src
    with ImageStore(h.store, read_only=True) as store:  # the mask the server stored is the painted stroke
        painted = Image.open(io.BytesIO(store.read_png(mask_id))).convert("L")
    assert painted.size == (256, 256)
    white = painted.point(lambda v: 255 if v >= 128 else 0).getbbox()
    assert white is not None
    x0, y0, x1, y1 = white
    # the stroke ran from 60% to 90% of the width at 50% height, with a brush of radius 16 px (2 tokens of 16);
    # 2 px for the antialiased rim and the pointer's position rounded to CSS pixels of a 256-px canvas shown
    # at its size
    radius, rim = 16, 2
    assert abs(x0 - (0.6 * 256 - radius)) <= rim and abs(x1 - (0.9 * 256 + radius)) <= rim
    assert abs(y0 - (128 - radius)) <= rim and abs(y1 - (128 + radius)) <= rim


async def test_a_pick_reaches_the_store_and_a_model_only_tool_is_refused(tmp_path: Path) -> None:
    async with hosted(tmp_path, width=390) as h:  # at phone width: the buttons must still be reachable
        await start(h, "generate", {"prompt": "a lighthouse", "seed": 9, "width": 128, "height": 128})
        view = h.view()
        await shown(h)
        image_id = await shown_id(h)
        await view.locator("#pick").click()
        await h.page.wait_for_function("() => window.hostLog.some(e => e.kind === 'context')")
        assert await view.locator("#pick").get_attribute("aria-pressed") == "true"
        await h.page.screenshot(path=str((shots() or tmp_path) / "view-phone-picked.png"), full_page=True)
        listed = await h.client.call_tool("list_images", {"standing": "pick"})
        assert [i["image_id"] for i in listed.structured_content["images"]] == [image_id]  # type: ignore[index]
        [context] = [e for e in await h.log() if e["kind"] == "context"]
        assert context["params"]["structuredContent"] == {"image_id": image_id, "verdict": "pick"}
        assert image_id in context["params"]["content"][0]["text"]

        # export_image writes files where the model says: model-only, so the host refuses it from the view
        target = tmp_path / "exported.png"
        refused = await h.page.evaluate(
            "async ([id, path]) => { try { await window.callFromView('export_image', {image_id: id, path}); "
            "return null } catch (e) { return String(e.message || e) } }",
            [image_id, str(target)],
        )
        assert refused is not None and "export_image is not a tool this view may call" in refused
        calls = [e for e in await h.log() if e["kind"] == "call"]
        assert {"name": "export_image", "allowed": False}.items() <= calls[-1].items()
        assert not target.exists()
