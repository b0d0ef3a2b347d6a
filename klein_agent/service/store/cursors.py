"""The list cursor: an opaque, URL-safe token for "the page after this one", bound to the session it lists.

The token carries a catalog position (`Catalog.page`): what a catalog sorts by, newest first. The SQLite catalog's
position is its insertion sequence (an int); the PostgreSQL catalog's is [created_at in microseconds, image_id]
(keyset pagination by (created_at, id)). The codec is the same for both; the catalog says which
positions it accepts (`Catalog.valid_position`), so a forged or stale token is a clear ValueError, never an SQL
error.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable

from klein_agent.rules.limits import MAX_CURSOR_CHARS

_CURSOR_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CURSOR_CHARS}}}", re.ASCII)


def encode_cursor(position: object, session: str | None) -> str:
    """The token for the page after `position` (a JSON value from the catalog) in the listing of `session`."""
    raw = json.dumps({"v": 1, "before": position, "session": session}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("ascii")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, session: str | None, valid: Callable[[object], bool]) -> object:
    """The position in `cursor`, checked by `valid` (the catalog's `valid_position`). Raises ValueError saying how
    to fix it: a malformed token, or one from a listing of another session."""
    shown = cursor[:40] + "..." if isinstance(cursor, str) and len(cursor) > 40 else cursor
    bad = ValueError(
        f"Invalid cursor {shown!r}. Pass next_cursor from the previous list_images result unchanged, "
        "or omit cursor to start from the newest image."
    )
    if not isinstance(cursor, str) or _CURSOR_RE.fullmatch(cursor) is None:
        raise bad
    try:
        obj = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(obj, dict) or obj.get("v") != 1 or set(obj) != {"v", "before", "session"}:
        raise bad
    if not valid(obj["before"]):
        raise bad
    if obj["session"] != session:
        raise ValueError(
            f"This cursor belongs to a listing with session={obj['session']!r}, not {session!r}. "
            "Pass the same session as the call that returned the cursor, or omit cursor."
        )
    return obj["before"]
