"""Time to first paint of the gallery over a large store, in headless Chromium.

    python tools/bench_gallery.py --images 1000 --runs 7
    python tools/bench_gallery.py --images 60 --sessions 4 --runs 1 --screenshots docs

Fills a scratch store with `--images` pictures (tools/fill_store.py), starts `klein-agent gallery` on it, and opens
the page `--runs` times, each in a fresh browser context (empty browser cache) with the bearer token as a header.
Per run: first paint and first contentful paint (the page's shell), the moment the first page of cards is in the
document (the page's own `gallery-cards` mark), and the moment every thumbnail in the viewport has loaded. The
first run finds no thumbnails on disk (the server makes the viewport's WebPs); later runs find them cached. The
table gives the first run and the median of the others.

`--screenshots DIR` also saves the page (DIR/gallery.png) and a session's lineage (DIR/gallery-lineage.png) at
1280x800, as in the README.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import chromium
from fill_store import fill

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klein_agent

from klein_agent.service.store import ImageStore

REPO = Path(__file__).resolve().parents[1]

VISIBLE_THUMBS_LOADED = """() => {
    const imgs = [...document.querySelectorAll('.card .thumb img')].filter(i => {
        const r = i.getBoundingClientRect();
        return r.bottom > 0 && r.top < innerHeight;
    });
    return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


def start_gallery(store: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "klein_agent", "gallery", "--store", str(store), "--port", "0"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while not (found := re.search(r"at (http://127\.0\.0\.1:\d+)/gallery/", log_path.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(log_path.read_text())
        time.sleep(0.05)
    return proc, found.group(1)


def one_run(browser: Any, base: str, token: str) -> dict[str, float]:
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, extra_http_headers={"Authorization": f"Bearer {token}"}
    )
    try:
        page = context.new_page()
        page.goto(base + "/gallery/")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function(VISIBLE_THUMBS_LOADED, timeout=60_000)
        thumbs_ms = page.evaluate("performance.now()")
        marks = page.evaluate(
            """() => Object.fromEntries([
                ...performance.getEntriesByType('paint').map(e => [e.name, e.startTime]),
                ...performance.getEntriesByName('gallery-cards').map(e => ['cards', e.startTime]),
            ])"""
        )
        cards = page.locator(".card").count()
    finally:
        context.close()
    return {
        "first-paint": marks["first-paint"],
        "first-contentful-paint": marks["first-contentful-paint"],
        "cards in the document": marks["cards"],
        "viewport thumbnails loaded": thumbs_ms,
        "cards": cards,
    }


def screenshots(browser: Any, base: str, token: str, folder: Path) -> None:
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, extra_http_headers={"Authorization": f"Bearer {token}"}
    )
    try:
        page = context.new_page()
        page.goto(base + "/gallery/")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function(VISIBLE_THUMBS_LOADED)
        first, second = page.locator(".card input[data-pick]").all()[:2]
        first.check()
        second.check()
        page.screenshot(path=str(folder / "gallery.png"))
        session = page.locator(".sessions a[data-session]").nth(1)
        session.click()
        page.wait_for_selector("ol.tree.root")
        # the first branch in view, under the image it came from
        page.evaluate(
            "document.querySelector('ol.tree.branch')?.closest('li.node')?.scrollIntoView(); scrollBy(0, -60)"
        )
        page.mouse.move(0, 0)
        page.wait_for_function(VISIBLE_THUMBS_LOADED)
        page.screenshot(path=str(folder / "gallery-lineage.png"))
    finally:
        context.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=25)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--screenshots", type=Path, default=None, metavar="DIR")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        with ImageStore(store, max_images=max(10_000, args.images)) as opened:
            fill(opened, args.images, args.sessions)
        proc, base = start_gallery(store, Path(scratch) / "gallery.log")
        token = (Path(scratch) / "store.http-token").read_text().strip()
        try:
            with sync_playwright() as playwright:
                browser = chromium.launch(playwright)
                runs = [one_run(browser, base, token) for _ in range(args.runs)]
                if args.screenshots:
                    screenshots(browser, base, token, args.screenshots)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    print(
        f"gallery, {args.images} images in {args.sessions} sessions, headless Chromium {platform.machine()}"
    )
    print(f"{runs[0]['cards']} cards on the first page; ms after navigation start")
    print(f"{'':28} {'first run':>10} {'median of the rest':>19}")
    for key in (
        "first-paint",
        "first-contentful-paint",
        "cards in the document",
        "viewport thumbnails loaded",
    ):
        rest = statistics.median(run[key] for run in runs[1:]) if len(runs) > 1 else float("nan")
        print(f"{key:28} {runs[0][key]:10.0f} {rest:19.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
