"""Debian's Chromium under Playwright, for the gallery's browser tests and tools/bench_gallery.py.

`npx playwright install` downloads a browser build, which this project's machines cannot do; Debian's package
(`apt-get install chromium`) is used instead, with the flags a headless run in a container needs: no sandbox
(containers run as root), no GPU, and none of the background traffic (component updates, sync, first-run pages)
that would try to reach the network.
"""

from __future__ import annotations

import os
from typing import Any

CHROMIUM = os.environ.get("KLEIN_AGENT_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch(playwright: Any) -> Any:
    """A headless Chromium browser from a started `sync_playwright()` (or its async twin's `chromium`)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)


def missing() -> str | None:
    """Why the browser tests cannot run here (no playwright, no Chromium), or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[test]'"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM}: apt-get install chromium (or set KLEIN_AGENT_CHROMIUM)"
    return None
