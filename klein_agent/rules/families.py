"""The two klein families, FLUX.2 [klein] and FLUX 3 [klein], as the rules and the texts see them. No torch.

What differs for a caller: the defaults of each variant (distilled and Base), how many references a call may
give, how references are prepared (FLUX 3 keeps one reference whole on a canvas of up to 4 Mpx and crops the
picture back to it: `rules.flux3_references`), and whether a masked edit has a reference pipeline. Every value is
read from `rules.limits`; the model presets (`model/configs.py`), the checks and the tool descriptions read them
here, so a default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from klein_agent.rules import limits
from klein_agent.rules.resolution import RequestError


@dataclass(frozen=True)
class Family:
    """One model family: its name in `GeneratorInfo.family`, its title in texts, and its limits and defaults."""

    name: str
    title: str
    max_references: int
    distilled_steps: int
    base_steps: int
    base_guidance: float
    # what the family is, in a refusal, when diffusers has no masked-edit (inpaint) pipeline for it; None: it has one
    no_masked_edits: str | None = None


FLUX2 = Family(
    "flux2",
    "FLUX.2 [klein]",
    limits.MAX_REFERENCES_BY_FAMILY["flux2"],
    limits.DISTILLED_STEPS,
    limits.BASE_STEPS,
    limits.BASE_GUIDANCE,
)
FLUX3 = Family(
    "flux3",
    "FLUX 3 [klein]",
    limits.MAX_REFERENCES_BY_FAMILY["flux3"],
    limits.FLUX3_DISTILLED_STEPS,
    limits.FLUX3_BASE_STEPS,
    limits.FLUX3_BASE_GUIDANCE,
    no_masked_edits="FLUX 3 [klein] models",
)
FAMILIES = {family.name: family for family in (FLUX2, FLUX3)}
# Both families by title, for texts about klein-agent itself (--help, the MCP server's description)
ALL_TITLES = " and ".join(f.title for f in FAMILIES.values())
KV_NO_MASKED_EDITS = "klein 9B-KV checkpoints"  # a FLUX.2 checkpoint without a masked pipeline in diffusers


# Models --model names without files: built-in tiny random models (tests, demos) and random weights of a preset's
# shape (`random:flux3-klein`, for benchmarks). FLUX 3 presets are named "flux3-..." (tests/test_flux3_wiring.py
# checks every preset against its transformer's kind).
BUILT_IN_MODELS = ("tiny", "flux3-tiny", "flux3-tiny-base")
RANDOM_PREFIX = "random:"
FLUX3_PRESET_PREFIX = "flux3-"


def preset_family(preset_name: str) -> Family:
    """The family of a preset (`model/configs.py` PRESETS), by its name: FLUX 3 presets start with "flux3-"."""
    return FLUX3 if preset_name.startswith(FLUX3_PRESET_PREFIX) else FLUX2


def family(name: str) -> Family:
    """The family called `name` ("flux2", "flux3"); raises ValueError naming the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def check_masked_edit(no_masked_edits: str | None) -> None:
    """Raises RequestError when a model without a masked-edit pipeline (`no_masked_edits` names it, e.g.
    `KV_NO_MASKED_EDITS` or a family's) is asked for one: the same sentence from the CLI, the server and the
    pipeline. None passes."""
    if no_masked_edits is None:
        return
    raise RequestError(
        f"masked edits (inpaint) are not supported on {no_masked_edits}: diffusers has no masked pipeline for "
        "them, so nothing decides what the repainted pixels should be; use edit (the whole picture, guided by the "
        "prompt), or a FLUX.2 klein 4B/9B model for inpaint"
    )


# What only FLUX 3 reads: why, and what another model does instead, for the refusal (`check_flux3_only`).
FLUX3_ONLY = {
    "caption": (
        "it replaces the prompt their text encoder reads",
        "encodes the prompt as given: leave caption out",
    ),
    "--prompt-upsampler": (
        "it writes the caption their text encoder reads",
        "encodes the prompt as given: leave --prompt-upsampler out",
    ),
    "layout": (
        "its boxes go into the caption they read",
        "takes no boxes: leave layout out, and say where things go in the prompt",
    ),
}


def check_flux3_only(option: str, family_name: str) -> None:
    """Raises RequestError when `option` (a key of FLUX3_ONLY) is given for a model of family `family_name` that is
    not FLUX 3: one sentence whether the CLI refuses it before the model loads or the pipeline after."""
    if family_name == FLUX3.name:
        return
    why, instead = FLUX3_ONLY[option]
    raise RequestError(
        f"{option} is for {FLUX3.title} models ({why}); a {family(family_name).title} model {instead}"
    )


def defaults_text() -> str:
    """Each variant's default steps and guidance, for help texts and tool descriptions: "4 for distilled FLUX.2
    [klein], 50 (guidance 4) for its Base; 16 for ..."."""
    return "; ".join(
        f"{f.distilled_steps} for distilled {f.title}, {f.base_steps} (guidance {f.base_guidance:g}) for its Base"
        for f in FAMILIES.values()
    )


def check_most_references(count: int) -> None:
    """Raises RequestError when `count` references are more than any family takes (`limits.MOST_REFERENCES`: what
    the server's input schema allows, before it knows the model), naming each family's limit."""
    if count > limits.MOST_REFERENCES:
        each = ", ".join(f"{f.title} {f.max_references}" for f in FAMILIES.values())
        raise RequestError(
            f"{count} reference images given, but no model takes more than {limits.MOST_REFERENCES} ({each}): "
            "pass fewer images, or compose in two rounds (combine some first, then use that result as one "
            "reference)"
        )
