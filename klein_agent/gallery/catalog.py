"""What the gallery shows of one stored image: the JSON of its card, built from the store's record and its recipe.

The recipe's keys are the store's (`klein_agent.service.making.store_results` and `import_input` write them); the
commands that remake a picture come from the one rule in `klein_agent.rules.recipes`.
"""

from __future__ import annotations

import shlex
from typing import Any

from klein_agent.rules.recipes import rerun_call, rerun_command
from klein_agent.service.store import StoredImage, Verdicts


def card(image: StoredImage, verdicts: Verdicts | None = None) -> dict[str, Any]:
    """One image as the page needs it: id, parents (in order), session, tool, the recipe's prompt, seed, size,
    model, steps and guidance, when it was stored (unix s), how long the model took (ms), what an import was,
    the whole recipe, the MCP call and CLI command that make it again (None for an import), and its verdicts:
    the standing pick or reject (None), its reason and time (unix s), and the newest notes, newest first."""
    recipe = image.recipe
    tool = str(recipe.get("tool", "unknown"))
    argv = rerun_command(recipe, image.parents, f"{image.image_id}.png")
    return {
        "id": image.image_id,
        "parents": list(image.parents),
        "session": image.session,
        "tool": tool,
        "prompt": _text(recipe.get("prompt")),
        "seed": _number(recipe.get("seed")),
        "width": image.width,
        "height": image.height,
        "size_bytes": image.size_bytes,
        "model": _text(recipe.get("model")),
        "variant": _text(recipe.get("variant")),
        "steps": _number(recipe.get("steps")),
        "guidance": _number(recipe.get("guidance")),
        "created_at": image.created_at,
        "elapsed_ms": _elapsed_ms(recipe),
        "source": _imported_from(recipe) if tool == "import" else None,
        "recipe": recipe,
        "mcp": rerun_call(recipe, image.parents),
        "cli": shlex.join(argv) if argv is not None else None,
        **verdict_fields(verdicts),
    }


def verdict_fields(verdicts: Verdicts | None) -> dict[str, Any]:
    """A card's verdict fields, for the card and for the live feed's updates (the same keys, so the page
    applies an update by assigning them): the standing pick or reject (None), its reason and time (unix s), and
    the newest notes, newest first."""
    standing = verdicts.standing if verdicts else None
    return {
        "verdict": standing.verdict if standing else None,
        "verdict_reason": standing.reason if standing else None,
        "verdict_at": standing.at if standing else None,
        "notes": [note.reason for note in verdicts.notes] if verdicts else [],
    }


def _imported_from(recipe: dict[str, Any]) -> str | None:
    """What an imported reference was: the input's description ("den.png (PNG, 96x64)", "URL ..."), else the kind
    of input (path, data_uri, url)."""
    return _text(recipe.get("description")) or _text(recipe.get("source"))


def _elapsed_ms(recipe: dict[str, Any]) -> float | None:
    """The model's time for the call (`model_ms`), else the pipeline's own total."""
    model_ms = _number(recipe.get("model_ms"))
    if model_ms is not None:
        return model_ms
    timings = recipe.get("timings_ms")
    return _number(timings.get("total")) if isinstance(timings, dict) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: object) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
