"""What an agent or a person decided about an image: `pick`, `reject` or a `note`, with a short reason.

The rule, shared by the MCP tool and the store: pick and reject set the image's standing, and the latest of them
wins (a reject after a pick replaces it; there is no separate "unpick"); notes never change the standing and add
up. Each image keeps its newest `VERDICT_HISTORY_PER_IMAGE` records, and always its standing one, so ten or a
thousand verdicts on one image cost a bounded number of rows.
"""

from __future__ import annotations

import unicodedata

from klein_agent.rules import limits
from klein_agent.rules.resolution import RequestError

STANDING = ("pick", "reject")  # the verdicts that set an image's standing; "note" does not


def check_verdict(verdict: object, reason: object) -> tuple[str, str]:
    """(verdict, reason) as stored: the verdict one of `limits.VERDICTS`, the reason on one line (runs of white
    space and control characters become one space), at most `VERDICT_REASON_MAX_CHARS` characters. A note needs
    a reason; pick and reject may have none (""). Raises RequestError naming the argument and what to send."""
    if not isinstance(verdict, str) or verdict.strip().lower() not in limits.VERDICTS:
        shown = verdict[:40] if isinstance(verdict, str) else type(verdict).__name__
        raise RequestError(f"verdict must be one of {', '.join(limits.VERDICTS)}, got {shown!r}")
    verdict = verdict.strip().lower()
    if reason is None:
        reason = ""
    if not isinstance(reason, str):
        raise RequestError(f"reason must be a string, got {type(reason).__name__}")
    flat = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in reason)
    text = " ".join(flat.split())
    if len(text) > limits.VERDICT_REASON_MAX_CHARS:
        raise RequestError(
            f"reason is {len(text)} characters; at most {limits.VERDICT_REASON_MAX_CHARS}: say it in a sentence "
            "(what is right or wrong, and where)"
        )
    if verdict == "note" and not text:
        raise RequestError('a note needs a reason: say what you noticed (e.g. "left hand has six fingers")')
    return verdict, text
