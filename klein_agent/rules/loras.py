"""LoRA adapters as a caller names them: `FILE[:SCALE]` on the command line, `[{name, scale}]` per call. No torch.

The adapters are loaded with the model (`klein_agent.loading.lora`); a call picks which of them run and how strongly
(a name without a scale runs at the scale the command line gave it, 1 by default). A call that names none runs
none, so a recipe without adapters remakes its picture on any server. `klein-agent generate` runs every adapter
it loads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from klein_agent.rules.resolution import RequestError, check_finite, number_text

MAX_LORA_SCALE = 4.0  # |scale|; published adapters are meant for 0.5 to 1.5, negative scales push away

Choice = tuple[str, float]  # (adapter name, scale)


def choices(
    items: Sequence[tuple[str, float | None]],
    loaded: Sequence[Choice],
    unloaded: Sequence[tuple[str, str]] = (),
) -> tuple[Choice, ...]:
    """Per-call (name, scale or None) -> (name, scale), a missing scale being the adapter's loaded default.
    Raises RequestError for an unknown name, or one of the `unloaded` (name, why) adapters the server could not
    load at start (saying why)."""
    known = dict(loaded)
    failed = dict(unloaded)
    result = []
    for name, scale in items:
        if name in failed:
            raise RequestError(
                f"LoRA adapter {name!r} could not be loaded when the server started, so it is not available: "
                f"{failed[name]}"
            )
        if name not in known:
            listing = ", ".join(known) or "none (start the server with --lora FILE)"
            raise RequestError(f"no LoRA adapter named {name!r} is loaded; loaded: {listing}")
        result.append((name, known[name] if scale is None else float(scale)))
    return tuple(result)


def check_scale(scale: float, name: str) -> float:
    """`scale` as a float; raises RequestError unless finite and |scale| <= MAX_LORA_SCALE."""
    check_finite(scale, f"LoRA {name!r}: scale")
    if not isinstance(scale, int | float) or abs(scale) > MAX_LORA_SCALE:
        raise RequestError(
            f"LoRA {name!r}: scale must be from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} (1 is the adapter as "
            f"trained, 0 turns it off), got {number_text(scale)}"
        )
    return float(scale)


def parse_lora_argument(text: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` (the CLI's --lora) -> (path, scale); the scale defaults to 1. Raises RequestError for a
    scale out of range, or one that is no number after a `.safetensors` file name."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            if head.lower().endswith(".safetensors"):  # FILE.safetensors:SCALE with a scale that is no number
                raise RequestError(
                    f"--lora {text}: the scale {tail!r} is not a number (FILE[:SCALE], e.g. {head}:0.8)"
                ) from None
            # else a colon in the path itself
    return Path(path), check_scale(scale, path)


def adapter_names(paths: Sequence[Path]) -> list[str]:
    """The names adapters are listed and chosen by: each file's stem, made unique with -2, -3, ..."""
    names: list[str] = []
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:60] or "lora"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def resolve_loras(asked: Sequence[Choice] | None, loaded: Sequence[Choice]) -> tuple[Choice, ...]:
    """The adapters a call runs, in order: `asked` checked against the `loaded` ones (name, default scale); none
    when `asked` is None. Raises RequestError for an unknown or repeated name or a scale out of range."""
    if not asked:
        return ()
    known = dict(loaded)
    seen: set[str] = set()
    for name, scale in asked:
        if name not in known:
            listing = ", ".join(known) or "none (start the server with --lora FILE)"
            raise RequestError(f"no LoRA adapter named {name!r} is loaded; loaded: {listing}")
        if name in seen:
            raise RequestError(f"LoRA {name!r} is given twice: give each adapter once")
        seen.add(name)
        check_scale(scale, name)
    return tuple((name, float(scale)) for name, scale in asked if scale != 0)
