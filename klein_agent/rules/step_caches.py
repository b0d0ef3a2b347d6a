"""Step caches as a caller names them: `KIND[:THRESHOLD]` on the command line, `{"kind", "threshold"}` per call.
No torch.

A step cache is off unless a call asks for one; the kinds, the threshold's range and its default live in
`rules/limits.py`, and the help text and the tool description are built from them here. The rule itself runs in
`klein_agent.model.step_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from klein_agent.rules import limits
from klein_agent.rules.resolution import RequestError, check_finite, number_text

KINDS_TEXT = ", ".join(limits.STEP_CACHE_KINDS)
THRESHOLD_TEXT = (
    f"above 0 and at most {limits.STEP_CACHE_MAX_THRESHOLD:g} (default {limits.STEP_CACHE_DEFAULT_THRESHOLD:g}; "
    "higher skips more steps and changes the picture more)"
)
# One sentence for the tool description and the CLI help.
DESCRIPTION = (
    f"A step cache for many-step runs (Base models, 50 steps): kind {KINDS_TEXT}, threshold {THRESHOLD_TEXT}. "
    f"After the first {limits.MAGCACHE_RETENTION_RATIO:.0%} of the steps it skips up to "
    f"{limits.MAGCACHE_MAX_SKIP_STEPS} steps in a row, reusing what the transformer added at the last computed "
    "step; the picture changes a little, and the recipe keeps the setting so a rerun makes the same bytes. Off "
    "unless given."
)


@dataclass(frozen=True)
class StepCache:
    """A checked step-cache choice: one of `limits.STEP_CACHE_KINDS` and its threshold."""

    kind: str
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        """The recipe's and the MCP argument's spelling: {"kind", "threshold"}."""
        return {"kind": self.kind, "threshold": self.threshold}


def check_step_cache(kind: object, threshold: object = None) -> StepCache:
    """A per-call choice -> StepCache; a None threshold is `limits.STEP_CACHE_DEFAULT_THRESHOLD`. Raises
    RequestError naming the kind or the threshold and what is allowed."""
    if kind not in limits.STEP_CACHE_KINDS:
        shown = kind if isinstance(kind, str) else number_text(kind)
        raise RequestError(f"step cache: kind must be one of {KINDS_TEXT}, got {shown!r}")
    if threshold is None:
        threshold = limits.STEP_CACHE_DEFAULT_THRESHOLD
    check_finite(threshold, "step cache: threshold")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0 < threshold <= limits.STEP_CACHE_MAX_THRESHOLD
    ):
        raise RequestError(f"step cache: threshold must be {THRESHOLD_TEXT}, got {number_text(threshold)}")
    return StepCache(str(kind), float(threshold))


def from_recipe(value: object) -> StepCache | None:
    """A recipe's or an MCP call's `cache` ({"kind", "threshold"}, or None) -> StepCache or None. Raises
    RequestError for anything else, naming the keys it takes."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"kind", "threshold"} or "kind" not in value:
        raise RequestError(
            f'step cache: give {{"kind": one of {KINDS_TEXT}, "threshold": a number}} (threshold optional), '
            f"got {value!r}"
        )
    return check_step_cache(value["kind"], value.get("threshold"))


def split_step_cache_argument(text: str) -> tuple[str, float | None]:
    """`KIND[:THRESHOLD]` (the CLI's --step-cache) -> (kind, threshold or None), unchecked: the call's
    `check_step_cache` judges both, with the server's messages. Raises RequestError for a threshold that is no
    number, which only the command line can send."""
    kind, sep, tail = text.partition(":")
    if not sep:
        return kind, None
    try:
        return kind, float(tail)
    except ValueError:
        raise RequestError(
            f"--step-cache {text}: the threshold {tail!r} is not a number (KIND[:THRESHOLD], e.g. "
            f"{limits.STEP_CACHE_KINDS[0]}:{limits.STEP_CACHE_DEFAULT_THRESHOLD:g})"
        ) from None


def parse_step_cache_argument(text: str) -> StepCache:
    """`KIND[:THRESHOLD]` (the CLI's --step-cache) -> StepCache. Raises RequestError for an unknown kind, a
    threshold that is no number, or one out of range."""
    return check_step_cache(*split_step_cache_argument(text))


def chosen_step_cache(choice: tuple[str, float | None] | None) -> StepCache | None:
    """A call's (kind, threshold or None) choice -> StepCache, or None for no cache. Raises RequestError as
    `check_step_cache`."""
    return None if choice is None else check_step_cache(*choice)
