"""Verdicts recorded after the gallery page loaded appear on its cards without a reload, in Chromium (Playwright):
`klein-agent gallery` in one process, `klein-agent serve --model tiny` over stdio in another, both on one SQLite
store, and the official MCP SDK client calling `record_verdict`. The pick outlines its card, a reject dims it and
replaces the pick, a note appears under the picture, and the Picks view gains and loses cards as picks come and
go, each within the feed's latency (POLL_S plus one small fetch) and through /api/verdicts only: the page is not
reloaded, its cards are not fetched again, and what it fetches holds the changed images, not the 60 on screen.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from klein_agent.gallery.app import POLL_S
from klein_agent.service.store import ImageStore
from tests.http_helpers import REPO, serve_args
from tests.test_gallery_browser import standalone_gallery
from tests.test_gallery_verdicts_browser import picture

pytestmark = pytest.mark.slow

IMAGES = 70  # more than the page's first 60 cards: the oldest ones are not on screen
# From a verdict's commit to its card: the feed looks every POLL_S, then the page makes one request to the
# gallery on this machine and redraws a card. One second is the bound (the feed's usual latency).
LATENCY_S = 1.0
assert 2 * POLL_S <= LATENCY_S, "the bound must leave room for a full poll interval and the fetch"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str, list[str]]]:
    """A store of IMAGES pictures in one session, every one of them with a note (newest first in the list), and
    the standalone gallery over it: (store, the gallery's page URL, its bearer token, ids)."""
    folder = tmp_path_factory.mktemp("live-verdicts")
    root = folder / "store"
    with ImageStore(root) as store:
        ids = []
        for k in range(IMAGES):
            recipe = {"tool": "generate", "prompt": f"a harbour at noon, take {k + 1}", "seed": k + 1}
            image_id = store.put(
                picture(k % 5), width=256, height=256, recipe=recipe, session="harbour"
            ).image_id
            store.record_verdict(image_id, "note", f"first look {k + 1}")
            ids.insert(0, image_id)
    with standalone_gallery(root, folder / "gallery.log") as (_, url):
        yield root, f"{url}/gallery/", (folder / "store.http-token").read_text().strip(), ids


class Agent:
    """The other client: `serve --model tiny` over stdio on the same store, driven by the official SDK client on a
    thread of its own (Playwright's sync API keeps an event loop running on the test's thread)."""

    def __init__(self, store: Path) -> None:
        self.params = StdioServerParameters(
            command=sys.executable, args=serve_args(store), cwd=REPO, env={"PYTHONPATH": str(REPO)}
        )

    def verdicts(self, *calls: tuple[str, str, str]) -> list[float]:
        """Record each (image_id, verdict, reason) in turn through one MCP session; the time (Unix s) each returned."""

        async def run() -> list[float]:
            returned = []
            async with Client(self.params) as client:
                for image_id, verdict, reason in calls:
                    result = await client.call_tool(
                        "record_verdict", {"image_id": image_id, "verdict": verdict, "reason": reason}
                    )
                    assert not result.is_error, result.content
                    returned.append(time.time())
            return returned

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(anyio.run, run).result()


@pytest.fixture
def page(shared: tuple[Path, str, str, list[str]]) -> Iterator[Any]:
    import chromium  # tools/, on the path through conftest
    from playwright.sync_api import sync_playwright

    _, url, token, _ = shared
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = chromium.launch(playwright)
        try:
            context = browser.new_context(
                viewport={"width": 1280, "height": 900},
                extra_http_headers={"Authorization": f"Bearer {token}"},
            )
            tab = context.new_page()
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.goto(url)
            tab.wait_for_selector("body[data-ready='1']")
            tab.wait_for_selector("#live.on")
            # when a card's class changes, the page notes the time (Unix ms): the latency is measured where it shows
            tab.evaluate(
                """() => {
                    window.stayed = true;  // gone if the page reloads
                    window.changedAt = {};
                    new MutationObserver((records) => {
                        for (const r of records) window.changedAt[r.target.dataset.imageId + ' ' + r.target.className] = Date.now();
                    }).observe(document.querySelector('#cards'), { subtree: true, attributes: true, attributeFilter: ['class'] });
                }"""
            )
            yield tab
            assert not errors, errors
        finally:
            browser.close()


def settled_after(page: Any, requests: list[str], limit_s: float = 10.0) -> None:
    """Wait until the page has made no request for 2 x POLL_S; fails after `limit_s` of a page that keeps
    fetching."""
    deadline = time.monotonic() + limit_s
    while True:
        seen = len(requests)
        page.wait_for_timeout(2 * POLL_S * 1000)
        if len(requests) == seen:
            return
        assert time.monotonic() < deadline, f"the page kept fetching for {limit_s:g} s: {requests}"


def shown_after(page: Any, image_id: str, cls: str, since: float) -> float:
    """Seconds from `since` (Unix s) until the card of `image_id` took the class `cls` (waits up to 10 s)."""
    key = f"{image_id} card tool-generate {cls}"
    page.wait_for_function(f"() => window.changedAt[{json.dumps(key)}] !== undefined", timeout=10_000)
    return float(page.evaluate(f"() => window.changedAt[{json.dumps(key)}]")) / 1000 - since


def test_a_verdict_from_another_client_shows_on_its_card_without_a_reload(
    shared: tuple[Path, str, str, list[str]], page: Any
) -> None:
    store, _, _, ids = shared
    agent = Agent(store)
    requests: list[str] = []
    answers: dict[str, Any] = {}
    page.on("request", lambda r: requests.append(r.url.split("/gallery/", 1)[-1]))
    page.on("response", lambda r: "api/verdicts" in r.url and answers.update({r.url: r.json()}))
    first, second = ids[0], ids[5]
    assert page.locator(".card").count() == 60 and page.locator(".card.verdict-pick").count() == 0

    # the feed's first event (the store as it is when the stream opens) may come after the page showed itself
    # live, and the page then checks the sessions once: the idle window starts when that is over
    settled_after(page, requests)
    requests.clear()
    page.wait_for_timeout(3 * POLL_S * 1000)
    assert requests == [], f"an idle page fetched {requests}: the feed only speaks when something changed"

    (picked_at,) = agent.verdicts((first, "pick", "crisp gulls"))
    assert shown_after(page, first, "verdict-pick", picked_at) < LATENCY_S
    card = page.locator(f'.card[data-image-id="{first}"]')
    assert card.locator(".standing").inner_text() == "★ Picked: crisp gulls"
    assert card.locator(".note").all_inner_texts() == ["first look 70"], "the notes stay"

    _, rejected_at = agent.verdicts((second, "note", "fog too thick"), (first, "reject", "on second look"))
    assert shown_after(page, first, "verdict-reject", rejected_at) < LATENCY_S
    assert card.locator(".standing").inner_text() == "✕ Rejected: on second look"
    other = page.locator(f'.card[data-image-id="{second}"]')
    page.wait_for_function(
        f"() => document.querySelectorAll('.card[data-image-id=\"{second}\"] .note').length === 2",
        timeout=10_000,
    )
    assert other.locator(".note").all_inner_texts() == ["fog too thick", "first look 65"]
    assert "verdict-" not in (other.get_attribute("class") or "")

    assert page.evaluate("window.stayed") is True, "the page was reloaded"
    fetched = [url for url in requests if not url.startswith("api/sessions")]
    assert fetched and all(url.startswith("api/verdicts?after=") for url in fetched), fetched
    changed = [change["id"] for answer in answers.values() for change in answer["changes"]]
    assert set(changed) == {first, second} and len(changed) <= 3, "only the images given a verdict are sent"


def test_the_picks_view_gains_and_loses_cards_as_picks_come_and_go(
    shared: tuple[Path, str, str, list[str]], page: Any
) -> None:
    store, _, _, ids = shared
    agent = Agent(store)
    page.locator("a.picks-link").click()
    page.wait_for_function("() => location.hash === '#picks' && document.body.dataset.ready === '1'")
    before = page.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.imageId)")
    newest, oldest = ids[1], ids[-1]  # the oldest is far behind the first page: it joins too (all picks fit)
    agent.verdicts((oldest, "pick", "the one"), (newest, "pick", "or this one"))
    page.wait_for_function(
        f"() => document.querySelectorAll('.card').length === {len(before) + 2}", timeout=10_000
    )
    shown = page.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.imageId)")
    assert shown[0] == newest and shown[-1] == oldest, "newest first, as the view lists them"
    assert page.locator("#empty").is_hidden()
    agent.verdicts((newest, "reject", "no"))
    page.wait_for_function(
        f"() => document.querySelectorAll('.card').length === {len(before) + 1}", timeout=10_000
    )
    assert page.locator(f'.card[data-image-id="{newest}"]').count() == 0
    assert page.evaluate("window.stayed") is True, "the page was reloaded"
