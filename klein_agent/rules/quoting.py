"""User text quoted inside a message: bounded, control characters escaped. One form for every message that
echoes an argument (paths, ids, URIs), so a 5,000-character argument never comes back whole."""

from __future__ import annotations


def ellipsize(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the last one an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show(text: str) -> str:
    """Quote user text for an error message: `repr` of at most 120 characters (an ellipsis when cut), so quotes,
    newlines and other control characters are escaped."""
    return repr(ellipsize(text, 120))
