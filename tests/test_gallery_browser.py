"""The gallery in a real browser (Playwright driving Debian's Chromium) over a real `serve --http` on the tiny
model: an MCP session's images and lineage, the full picture and its recipe, the compare view, live updates while
the agent works, the login link, the refusals and the 404 page; and a 1,000-image store paged 60 at a time.

One browser and one server for the module; each test gets a fresh browser context (its own cookies).
Without Playwright or Chromium these tests are skipped, except where KLEIN_AGENT_REQUIRE_BROWSER is set (.ci/run
sets it, so CI fails instead).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import chromium  # tools/, on the path through conftest
import pytest
from fill_store import HOSTILE_PARENT, fill, odd_cases
from mcp import Client

from klein_agent.rules.recipes import rerun_call, rerun_command
from klein_agent.service.store import ImageStore
from tests.fakes import png_bytes
from tests.http_helpers import REPO, authed, http_server, wait_listening

pytestmark = pytest.mark.slow

_why_not = chromium.missing()
if _why_not and os.environ.get("KLEIN_AGENT_REQUIRE_BROWSER"):
    raise RuntimeError(f"KLEIN_AGENT_REQUIRE_BROWSER is set, but {_why_not}")
if _why_not:
    pytest.skip(_why_not, allow_module_level=True)


@dataclass
class Server:
    """A running `serve --http` with its gallery: where it is, its token, its (one) login link, its folders."""

    port: int
    token: str
    link: str
    store: Path
    inputs: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """One MCP tool call through the official client over HTTP; its structured result."""

        async def run() -> dict[str, Any]:
            async with Client(authed(self.port, self.token)) as client:
                result = await client.call_tool(tool, arguments)
                assert not result.is_error, result.content
                return result.structured_content  # type: ignore[return-value]

        # on a thread of its own: Playwright's sync API keeps an event loop running on this one
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(anyio.run, run).result()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = chromium.launch(playwright)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("gallery-serve")
    inputs = folder / "inputs"
    inputs.mkdir()
    with http_server(folder, folder / "store", "--allow-dir", str(inputs)) as (_, port, token):
        log = (folder / "server.log").read_text()
        found = re.search(r"open http://127\.0\.0\.1:\d+(/login\?key=\S+) \(works once\)", log)
        assert token is not None and found, log
        yield Server(port, token, found.group(1), folder / "store", inputs)


@pytest.fixture(scope="module")
def session(server: Server) -> dict[str, Any]:
    """An agent's session: generate, edit by id, compose of the two ids, and an edit of a file (an import)."""
    fox = server.call(
        "generate", {"prompt": "a red fox", "seed": 1, "width": 64, "height": 64, "session": "fox"}
    )
    gen = fox["images"][0]
    night = server.call(
        "edit", {"image": gen["image_id"], "prompt": "make it night", "seed": 2, "session": "fox"}
    )
    edit = night["images"][0]
    both = server.call(
        "compose",
        {"images": [edit["image_id"], gen["image_id"]], "prompt": "image 1 beside image 2", "seed": 3,
         "width": 96, "height": 64, "session": "fox"},
    )  # fmt: skip
    comp = both["images"][0]
    (server.inputs / "den.png").write_bytes(png_bytes(96, 64))
    den = server.call("edit", {"image": str(server.inputs / "den.png"), "prompt": "a den", "session": "fox"})
    from_file = den["images"][0]
    return {"gen": gen, "edit": edit, "comp": comp, "from_file": from_file, "import": from_file["parents"][0]}


@pytest.fixture(scope="module")
def logged_in(browser: Any, server: Server, session: dict[str, Any]) -> Iterator[Any]:
    """A browser context that used the server's one login link (so no other test may use it)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    response = page.goto(server.url + server.link)
    assert response is not None and response.ok and page.url == server.url + "/gallery/"
    page.close()
    yield context
    context.close()


@contextlib.contextmanager
def open_gallery(context: Any, server: Server, hash_: str = "") -> Iterator[Any]:
    """The gallery in a new tab, closed after: each open page holds one of the browser's ~6 connections to the
    server for its live feed."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.url}/gallery/{hash_}")
    page.wait_for_selector("body[data-ready='1']")
    try:
        yield page
        assert not errors, errors
    finally:
        page.close()


def lineage(page: Any) -> dict[str, list[str]]:
    """What the page says: each card's id -> its parents, read from data-image-id and data-parents."""
    found = page.eval_on_selector_all(
        ".card", "cards => cards.map(c => [c.dataset.imageId, c.dataset.parents])"
    )
    return {image_id: json.loads(parents) for image_id, parents in found}


def test_an_mcp_session_appears_with_its_cards_and_lineage(
    logged_in: Any, server: Server, session: dict
) -> None:
    with open_gallery(logged_in, server) as page:
        gen, edit, comp, from_file, imported = (
            session[k] for k in ("gen", "edit", "comp", "from_file", "import")
        )
        assert lineage(page) == {
            from_file["image_id"]: [imported],
            imported: [],
            comp["image_id"]: [edit["image_id"], gen["image_id"]],  # the order of the call's images
            edit["image_id"]: [gen["image_id"]],
            gen["image_id"]: [],
        }
        order = page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.imageId)")
        assert order == [from_file["image_id"], imported, comp["image_id"], edit["image_id"], gen["image_id"]]
        card = page.locator(f'.card[data-image-id="{gen["image_id"]}"]')
        text = card.inner_text()
        for fact in ("GENERATE", "a red fox", "seed 1", "64×64", "tiny", "steps"):
            assert fact.lower() in text.lower(), fact
        assert card.locator(".made-into .chip").evaluate_all("cs => cs.map(c => c.dataset.ref)") == [
            edit["image_id"],
            comp["image_id"],
        ]
        assert page.locator(f'.card[data-image-id="{comp["image_id"]}"] .from .chip').evaluate_all(
            "cs => cs.map(c => c.dataset.ref)"
        ) == [edit["image_id"], gen["image_id"]]
        reference = page.locator(f'.card[data-image-id="{imported}"]')
        assert reference.get_attribute("data-tool") == "import"
        assert "reference" in reference.inner_text().lower() and "den.png" in reference.inner_text()
        assert reference.locator(".tool").get_attribute("title") == "imported reference"
        # Thumbnails are encoded on first request and load lazily and asynchronously, after data-ready: wait for
        # every one to settle (a hang guard, not a timing claim), then ask that each decoded to a picture.
        page.wait_for_function(
            "() => [...document.querySelectorAll('.card .thumb img')].every(i => i.complete)", timeout=60_000
        )
        broken = page.eval_on_selector_all(
            ".card .thumb img", "imgs => imgs.filter(i => i.naturalWidth === 0).map(i => i.src)"
        )
        assert broken == []
        assert page.locator(".group h2").all_inner_texts() == ["fox"]

        # the session's own view: its lineage as a tree, oldest first
        page.click('.sessions a[data-session="fox"]')
        page.wait_for_selector("ol.tree.root")
        page.wait_for_selector("body[data-ready='1']")
        with open_gallery(logged_in, server) as everything:
            assert lineage(page) == lineage(everything)
        tree = page.eval_on_selector_all(
            "li.node > .card",
            "cards => cards.map(c => [c.dataset.imageId, c.closest('ol').classList.contains('branch')])",
        )
        assert tree[0] == [gen["image_id"], False], "the session starts from its first picture"
        assert [image_id for image_id, _ in tree].index(edit["image_id"]) < [i for i, _ in tree].index(
            comp["image_id"]
        )


def test_the_full_picture_its_recipe_and_the_commands_that_remake_it(
    logged_in: Any, server: Server, session: dict
) -> None:
    logged_in.grant_permissions(["clipboard-read", "clipboard-write"])
    with open_gallery(logged_in, server) as page:
        comp = session["comp"]["image_id"]
        page.click(f'.card[data-image-id="{comp}"] .thumb')
        dialog = page.locator("dialog#detail[open]")
        dialog.wait_for()
        full = dialog.locator(".full img")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=full.element_handle())
        assert full.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [96, 64]
        with ImageStore(server.store, read_only=True) as store:
            image = store.get(comp)
            png = store.read_png(comp)
        argv = rerun_command(image.recipe, image.parents, f"{comp}.png")
        assert argv is not None
        cli = dialog.locator("pre.cli").inner_text()
        assert "--seed 3" in cli and f"--image {session['edit']['image_id']}.png" in cli
        assert cli == shlex.join(argv)
        assert json.loads(dialog.locator("pre.mcp").inner_text()) == rerun_call(image.recipe, image.parents)
        dialog.get_by_role("button", name="Copy CLI command").click()
        assert page.evaluate("navigator.clipboard.readText()") == cli
        download = dialog.get_by_role("link", name="Download PNG")
        assert download.get_attribute("download") == f"{comp}.png"
        response = logged_in.request.get(server.url + "/gallery/" + download.get_attribute("href"))
        assert response.ok and response.body() == png
        assert "attachment" in response.headers["content-disposition"]

        # a parent chip opens that image
        dialog.locator(f'.from .chip[data-ref="{session["gen"]["image_id"]}"]').click()
        page.wait_for_selector(
            f'dialog#detail[open] .detail-body[data-image-id="{session["gen"]["image_id"]}"]'
        )
        page.keyboard.press("Escape")
        assert page.locator("dialog#detail[open]").count() == 0

        # an imported reference says so, and offers no command
        page.click(f'.card[data-image-id="{session["import"]}"] .thumb')
        page.wait_for_selector(f'dialog#detail[open] .detail-body[data-image-id="{session["import"]}"]')
        assert "given to the agent, not made by the model" in page.locator("dialog#detail").inner_text()
        assert page.locator("dialog#detail pre.cli").count() == 0


def test_two_pictures_side_by_side_with_a_slider_and_a_blink(
    logged_in: Any, server: Server, session: dict
) -> None:
    with open_gallery(logged_in, server) as page:
        a, b = session["gen"]["image_id"], session["edit"]["image_id"]
        assert page.locator("#compare-bar").is_hidden()
        page.check(f'.card[data-image-id="{a}"] input[data-pick]')
        assert page.locator("#compare-open").is_disabled()
        page.check(f'.card[data-image-id="{b}"] input[data-pick]')
        page.click("#compare-open")
        stage = page.locator("dialog#compare[open] .stage")
        stage.wait_for()
        figures = stage.locator("figure").evaluate_all("fs => fs.map(f => f.dataset.imageId)")
        assert figures == [a, b]
        page.wait_for_function(
            "() => [...document.querySelectorAll('dialog#compare img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        assert "mode-side" in stage.get_attribute("class")

        page.click("dialog#compare button[data-mode=slider]")
        assert "mode-slider" in stage.get_attribute("class")
        page.locator("dialog#compare input.slider").fill("20")
        assert "20%" in stage.locator("figure.side-b img").evaluate("i => getComputedStyle(i).clipPath")

        page.click("dialog#compare button[data-mode=blink]")
        shown = {page.locator("figure.side-b").evaluate("f => getComputedStyle(f).visibility")}
        deadline = time.monotonic() + 5
        while len(shown) < 2 and time.monotonic() < deadline:
            shown.add(page.locator("figure.side-b").evaluate("f => getComputedStyle(f).visibility"))
            page.wait_for_timeout(100)
        assert shown == {"visible", "hidden"}, "blink shows B and hides it in turn"
        page.keyboard.press("Escape")


def test_new_images_appear_while_the_agent_works(logged_in: Any, server: Server, session: dict) -> None:
    with open_gallery(logged_in, server) as page:
        page.wait_for_selector("#live.on")
        page.evaluate("window.stayed = true")  # gone if the page reloads
        before = page.locator(".card").count()
        made: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: made.update(
                server.call(
                    "edit", {"image": session["comp"]["image_id"], "prompt": "add snow", "session": "fox"}
                )
            )
        )
        worker.start()
        try:
            page.wait_for_function(
                f"() => document.querySelectorAll('.card').length === {before + 1}", timeout=60_000
            )
        finally:
            worker.join(timeout=120)
        new = made["images"][0]["image_id"]
        assert page.locator(".card").first.get_attribute("data-image-id") == new
        assert json.loads(page.locator(".card").first.get_attribute("data-parents")) == [
            session["comp"]["image_id"]
        ]
        comp_card = page.locator(f'.card[data-image-id="{session["comp"]["image_id"]}"]')
        assert new in comp_card.locator(".made-into .chip").evaluate_all("cs => cs.map(c => c.dataset.ref)")
        assert page.evaluate("window.stayed") is True
        page.wait_for_function(
            f"() => document.querySelector('#total').textContent === '{before + 1} images'", timeout=10_000
        )


def test_refusals_the_spent_link_and_the_404_page(browser: Any, logged_in: Any, server: Server) -> None:
    stranger = browser.new_context()
    try:
        page = stranger.new_page()
        response = page.goto(server.url + "/gallery/")
        assert response.status == 401 and "login link" in page.inner_text("body")
        response = page.goto(server.url + server.link)
        assert response.status == 401 and "works once" in page.inner_text("body")
        assert stranger.request.get(server.url + "/gallery/api/sessions").status == 401
    finally:
        stranger.close()

    # the gallery's cookie opens the gallery, not the MCP endpoint
    assert logged_in.request.get(server.url + "/gallery/api/sessions").ok
    assert logged_in.request.post(server.url + "/mcp", data="{}").status == 401

    page = logged_in.new_page()
    for path in (
        "/gallery/image/img_AAAAAAAAAAAAAAAAAAAAAA.png",
        "/gallery/thumb/..%2F..%2Fstore.sqlite3",
        "/gallery/no/such/page",
    ):
        response = page.goto(server.url + path)
        assert response.status == 404 and "Not found" in page.inner_text("body"), path
        page.click("text=Back to the gallery")
        page.wait_for_selector("body[data-ready='1']")


@contextlib.contextmanager
def standalone_gallery(root: Path, log_path: Path) -> Iterator[tuple[str, str]]:
    """`klein-agent gallery --store root` in a process of its own: (its one-time login link, its base URL)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "klein_agent", "gallery", "--store", str(root), "--port", "0"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (
            found := re.search(r"open ((http://127\.0\.0\.1:(\d+))/login\?key=\S+)", log_path.read_text())
        ):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        wait_listening(int(found.group(3)))
        yield found.group(1), found.group(2)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_a_thousand_images_are_paged(browser: Any, tmp_path: Path) -> None:
    root = tmp_path / "store"
    with ImageStore(root, max_images=2000) as store:
        fill(store, images=1000, sessions=20)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    with standalone_gallery(root, tmp_path / "gallery.log") as (link, _):
        try:
            page = context.new_page()
            page.goto(link)
            page.wait_for_selector("body[data-ready='1']")
            assert page.locator(".card").count() == 60, "the first paint holds one page of cards"
            assert page.inner_text("#total") == "1000 images"
            assert page.locator(".sessions a[data-session]").count() == 20
            page.locator("#load-more").scroll_into_view_if_needed()
            page.wait_for_function("() => document.querySelectorAll('.card').length === 120")
            ids = page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.imageId)")
            assert len(set(ids)) == 120
        finally:
            context.close()


# ---- awkward cards, at a desk's and a phone's size ---------------------------------------------------------------

VIEWPORTS = {"desk": {"width": 1400, "height": 1000}, "phone": {"width": 390, "height": 844}}


@dataclass
class OddGallery:
    """A standalone gallery over `odd_cases`' 20 cards: its base URL, bearer token, notable ids, and store."""

    url: str
    token: str
    roles: dict[str, str]
    store: Path


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OddGallery]:
    folder = tmp_path_factory.mktemp("gallery-odd")
    root = folder / "store"
    with ImageStore(root) as store:
        roles = odd_cases(store)
    with standalone_gallery(root, folder / "gallery.log") as (_, url):
        yield OddGallery(url, (folder / "store.http-token").read_text().strip(), roles, root)


@contextlib.contextmanager
def odd_page(browser: Any, odd: OddGallery, size: str, hash_: str = "") -> Iterator[Any]:
    """The odd gallery at one of VIEWPORTS, ready, in a context of its own; no script error allowed."""
    context = browser.new_context(
        viewport=VIEWPORTS[size], extra_http_headers={"Authorization": f"Bearer {odd.token}"}
    )
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{odd.url}/gallery/{hash_}")
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        yield page
        assert not errors, errors
    finally:
        context.close()


def stored(odd: OddGallery) -> list[tuple[str, str]]:
    """The store's (id, session) pairs, newest first; "" for no session."""
    with ImageStore(odd.store, read_only=True) as store:
        images, _ = store.list_images(limit=100)
    return [(i.image_id, i.session or "") for i in images]


def ids_of(odd: OddGallery, session: str) -> list[str]:
    """One session's ids, newest first ("" for the images without a session)."""
    return [image_id for image_id, s in stored(odd) if s == session]


@pytest.mark.parametrize("size", VIEWPORTS)
def test_a_hostile_parent_id_stops_no_view(browser: Any, odd: OddGallery, size: str) -> None:
    everything = [image_id for image_id, _ in stored(odd)]
    assert len(everything) == 20
    with odd_page(browser, odd, size) as page:
        assert sorted(lineage(page)) == sorted(everything), "all 20 cards"
        assert lineage(page)[odd.roles["hostile"]][-1] == HOSTILE_PARENT
        hostile = page.locator(f'.card[data-image-id="{odd.roles["hostile"]}"]')
        chips = hostile.locator(".from .chip").evaluate_all("cs => cs.map(c => c.dataset.ref)")
        assert chips[-1] == HOSTILE_PARENT, "shown as text, its markup inert"
        assert hostile.locator(".from b").count() == 0
    with odd_page(browser, odd, size, "#session=agent-b") as page:
        assert list(lineage(page)) == ids_of(odd, "agent-b")[::-1], "the session's 8, oldest first"


@pytest.mark.parametrize("size", VIEWPORTS)
def test_sessions_that_take_turns_stay_one_group_each(browser: Any, odd: OddGallery, size: str) -> None:
    """Two agents storing in turn: one group per session, the most recently active first, newest first inside."""
    with odd_page(browser, odd, size) as page:
        groups = page.eval_on_selector_all(
            ".group",
            "gs => gs.map(g => [g.dataset.session, [...g.querySelectorAll('.card')].map(c => c.dataset.imageId)])",
        )
    by_activity = list(dict.fromkeys(session for _, session in stored(odd)))
    assert [name for name, _ in groups] == by_activity == ["agent-a", "agent-b", ""]
    for name, ids in groups:
        assert ids == ids_of(odd, name)


CARD_HEADS = """cards => cards.map(card => {
    const box = r => { const b = r.getBoundingClientRect(); return [b.top, b.bottom]; };
    const id = card.querySelector('.id');
    return {
        id: card.dataset.imageId,
        shown: id.textContent,
        fits: id.scrollWidth <= id.clientWidth,
        tool: box(card.querySelector('.tool')),
        pick: box(card.querySelector('.pick input')),
        label: box(card.querySelector('.pick')),
    };
})"""


@pytest.mark.parametrize("size", VIEWPORTS)
@pytest.mark.parametrize("view", ["", "#session=agent-a"])
def test_every_card_shows_its_whole_id_and_its_compare_box_beside_the_tool(
    browser: Any, odd: OddGallery, size: str, view: str
) -> None:
    with odd_page(browser, odd, size, view) as page:
        heads = page.eval_on_selector_all(".card", CARD_HEADS)
    assert odd.roles["inpaint"] in [h["id"] for h in heads]
    for head in heads:
        assert head["shown"] == head["id"] and head["fits"], head
        middle = (
            sum(head["pick"]) / 2
        )  # the box's middle lies within the tool badge's line, as its label's does
        assert head["tool"][0] <= middle <= head["tool"][1], head
        assert head["label"][0] <= middle <= head["label"][1], head


@pytest.mark.parametrize("size", VIEWPORTS)
def test_the_slider_hint_and_the_two_captions_do_not_overlap(
    browser: Any, odd: OddGallery, size: str
) -> None:
    with odd_page(browser, odd, size) as page:
        for box in page.locator(".card input[data-pick]").all()[:2]:
            box.check()
        page.click("#compare-open")
        page.wait_for_function(
            "() => [...document.querySelectorAll('dialog#compare img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        for mode in ("side", "slider", "blink"):
            page.click(f"dialog#compare button[data-mode={mode}]")
            rects = page.evaluate(
                """() => [...document.querySelectorAll('dialog#compare figcaption, dialog#compare .compare-hint')]
                    .map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })"""
            )
            assert len(rects) == 3
            for i, a in enumerate(rects):
                for b in rects[i + 1 :]:
                    apart = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
                    assert apart, (mode, a, b)
