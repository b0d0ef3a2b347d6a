"""argparse types for numbers the commands share (ports, positive limits): a bad value is an instant usage error
(exit 2) that names the option, before anything heavy is imported."""

from __future__ import annotations

import argparse
import math


def _parse(text: str, cast: type[int] | type[float], kind: str) -> float:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _at_least(
    text: str, cast: type[int] | type[float], kind: str, low: float, above: bool, why: str
) -> float:
    value = _parse(text, cast, kind)
    if value < low or (above and value == low):
        raise argparse.ArgumentTypeError(f"{why}, got {text.strip()}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0 lets the system pick a free one)."""
    value = int(_parse(text, int, "a port number"))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (0 picks a free port), got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (--max-megapixels, --store-max-gb)."""
    return float(_at_least(text, float, "a number", 0, True, "must be positive"))


def non_negative_gib(text: str) -> float:
    """A finite number of GiB, 0 or more (--reference-kv-cache-gib)."""
    return float(
        _at_least(text, float, "a number of GiB", 0, False, "expected a finite number of GiB of at least 0")
    )


def positive_int(text: str) -> int:
    """A whole number of at least 1 (--store-max-images, --num-images)."""
    return int(_at_least(text, int, "a whole number", 1, False, "must be positive"))


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (--max-queue)."""
    return int(_at_least(text, int, "a whole number", 0, False, "must be 0 or more"))
