"""The provenance every picture carries, in the store and in CLI-written PNGs alike. No torch.

`provenance` is what decides the pixels plus how the picture was asked for (tool, parents); it is written into
the PNG's `klein-agent` text chunk by `previews.encode_png`, so it must be the same on every re-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from klein_agent.rules.requests import GenerationResult

TOOLS = ("generate", "edit", "compose")


def tool_for(reference_count: int) -> str:
    """The tool name a call with this many references is: generate (none), edit (one), compose (several)."""
    return TOOLS[min(reference_count, 2)]


def provenance(result: GenerationResult, k: int, *, tool: str, parents: Sequence[str]) -> dict[str, Any]:
    """Picture k's recipe (prompt, seed, size, steps, guidance, model, variant) with its tool and parents: store
    image ids from the server, the input files as given from the CLI, in "image 1, image 2" order."""
    return {"tool": tool, **result.recipe(k), "parents": list(parents)}
