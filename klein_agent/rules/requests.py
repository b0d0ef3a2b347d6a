"""What a caller asks the model for, and the interface every image generator offers.

This module imports no torch: the store, the server's validation code and test fakes depend on it, and they must
stay light. The real implementation is `klein_agent.pipeline.KleinPipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from PIL import Image

from klein_agent.rules import limits
from klein_agent.rules.families import check_flux3_only, check_masked_edit
from klein_agent.rules.flux3_references import flux3_reference_sizes
from klein_agent.rules.layout import LayoutBox
from klein_agent.rules.loras import choices, resolve_loras
from klein_agent.rules.masks import check_strength, first_step, fit_mask
from klein_agent.rules.references import original_size
from klein_agent.rules.resolution import (
    ReferenceRule,
    RequestError,
    ResolvedRequest,
    flux2_reference_sizes,
    resolve_request,
)
from klein_agent.rules.step_caches import StepCache, check_step_cache

# progress(done, total, message): `done` rises strictly from 1 to `total` during one `generate` call.
# The units are: 1 for conditioning (prompt and references), one per denoising step, 1 for decoding.
# A callback that raises stops the run at the next unit boundary; the exception propagates unchanged and
# nothing is returned. That is how the engine cancels a call between denoising steps.
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class GenerationRequest:
    """One call: text-to-image with no references, an edit with one, a composition with several.

    Unset values are resolved by `klein_agent.rules.resolution.resolve_request` (the reference's size rule, a drawn
    seed, the model's default steps and guidance).
    """

    prompt: str
    width: int | None = None  # px; None: the first reference's prepared size, else 1024 (see resolution)
    height: int | None = None
    seed: int | None = None  # None: drawn at random; image k uses seed + k
    num_images: int = 1  # image k equals, byte for byte, a single run with seed + k
    steps: int | None = None  # None: the model's default (limits.DISTILLED_STEPS or BASE_STEPS)
    guidance: float | None = None  # None: the model's default; distilled models take none
    references: tuple[Image.Image, ...] = field(default=(), compare=False)  # RGB, in "image 1, image 2" order
    # A masked edit (inpainting) when set: references[0] is the picture to repaint, the rest condition the
    # repainted area (the reference's `image_reference`). Any size with the source's aspect ratio; white repaints.
    mask: Image.Image | None = field(default=None, compare=False)
    strength: float | None = None  # masked edits: None is limits.DEFAULT_STRENGTH; 1 repaints from pure noise
    # LoRA adapters to run, (name, scale) in order, from those the model loaded (a None scale: the adapter's
    # default); None or () runs none
    loras: tuple[tuple[str, float | None], ...] | None = None
    step_cache: StepCache | None = None  # off unless given (rules.step_caches)
    # FLUX 3: the text its encoder reads instead of `prompt` (a caller's caption, verbatim); None: the upsampler's
    # caption when one is loaded, else the prompt as given (klein_agent.pipeline.captioning)
    caption: str | None = None
    # FLUX 3: boxes placing objects (rules.layout, checked), written into the caption's box table: the upsampler's
    # box mode, or put back into a caller's caption (klein_agent.pipeline.captioning)
    layout: tuple[LayoutBox, ...] = ()
    # the inputs as the upsampler sees them (rules.upsampling.prepare_references), when one is loaded
    upsampler_references: tuple[Image.Image, ...] = field(default=(), compare=False)
    # The client's idempotency key for this call, when it gave one: what keeps a call retried after a failure (a
    # replica that died, a front-end that died) from being stored twice. Not part of what the model makes.
    call_id: str | None = field(default=None, compare=False)


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or infinite values; nothing usable was made. The message names the likely cause."""


@dataclass(frozen=True)
class GenerationResult:
    """The pictures of one `generate` call, what ran to make them, and how long each stage took (ms)."""

    images: list[Image.Image]  # RGB, width x height, one per seed
    timings_ms: dict[str, float]  # {"text", "references", "denoise", "decode", "total"}
    # {"prompt": 0 or 1, "references": n hits}, for klein 9B-KV "reference_kv": 0 or 1, and with a step cache
    # "steps_skipped": transformer passes it skipped (both guidance passes, every picture)
    cache_hits: dict[str, int]
    resolved: ResolvedRequest  # what ran: size, seeds, steps, guidance, references as prepared
    info: GeneratorInfo  # the model that ran it
    # FLUX 3: the text the model encoded, and where it came from (limits.CAPTION_SOURCES); None for FLUX.2
    caption: str | None = None
    caption_source: str | None = None

    def recipe(self, k: int) -> dict[str, Any]:
        """What decides the pixels of image k: re-running it (num_images 1) gives the same PNG bytes."""
        r = self.resolved
        # the caption, not its source, is what decides the pixels: a rerun passes it verbatim and gets this recipe
        width, height = r.picture_size
        return {
            "prompt": r.prompt,
            **({} if self.caption is None else {"caption": self.caption}),
            "seed": r.seeds[k],
            "width": width,
            "height": height,
            "steps": r.steps,
            "guidance": r.guidance,
            "model": self.info.model,
            "variant": self.info.variant,
            **({} if r.strength is None else {"strength": r.strength}),
            **({"loras": [{"name": n, "scale": s} for n, s in r.loras]} if r.loras else {}),
            **({} if r.step_cache is None else {"cache": r.step_cache.as_dict()}),
            # FLUX 3's single reference: made on its canvas and cropped back; a rerun gives no size (a size given
            # turns the crop-back off), so the box says where the width x height above came from
            **({} if r.crop is None else {"reference_crop": list(r.crop)}),
        }


@dataclass(frozen=True)
class GeneratorInfo:
    """A loaded model as the resolution rules and the server see it: its name, placement and defaults."""

    model: str  # what the user named: a folder, a repo id, or "tiny"
    variant: str  # preset name, e.g. "klein-4b", "klein-base-9b", "tiny"
    device: str
    dtype: str
    distilled: bool
    default_steps: int
    default_guidance: float
    max_references: int
    size_multiple: int = (
        limits.SIZE_MULTIPLE
    )  # px per latent token side; prepared references and outputs are multiples of it
    loras: tuple[tuple[str, float], ...] = ()  # the loaded LoRA adapters: (name, default scale)
    unloaded_loras: tuple[tuple[str, str], ...] = ()  # adapters `serve` could not load: (name, why)
    family: str = "flux2"  # rules.families: "flux2" (FLUX.2 [klein]) or "flux3" (FLUX 3 [klein])
    # what this model is, in the refusal of a masked edit, when diffusers has no masked pipeline for it (klein
    # 9B-KV, FLUX 3: `rules.families.check_masked_edit`); None: masked edits run
    no_masked_edits: str | None = None

    def summary(self) -> str:
        """One readable line for logs: `klein-4b (black-forest-labs/FLUX.2-klein-4B) on cuda, bfloat16`."""
        model = self.variant if self.model == self.variant else f"{self.variant} ({self.model})"
        adapters = f", LoRA {', '.join(name for name, _ in self.loras)}" if self.loras else ""
        return f"{model} on {self.device}, {self.dtype}{adapters}"


class ImageGenerator(Protocol):
    """What the engine, the CLI and test fakes need of a model: its `info` and `generate`.

    A generator may also say how many calls it takes at once with an int attribute or property `max_in_flight`
    (read through `max_in_flight` below, by the engine each time it may start a call, so it must be cheap and may
    change). Without it a generator takes one call at a time, as a local model does; a generator that fronts a
    pool of replicas (`replica/handle.py` `RayGenerator`) says how many it can keep busy.
    """

    info: GeneratorInfo

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run one request to completion on the calling thread. Not thread-safe unless `max_in_flight` says so:
        then up to that many threads call it at once."""
        ...


def max_in_flight(generator: object) -> int:
    """How many calls `generator` takes at once: its `max_in_flight` (at least 1), else 1 (a local model: one
    thread owns it). Raises nothing: a value that is not a positive int counts as 1."""
    value = getattr(generator, "max_in_flight", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def resolve(request: GenerationRequest, info: GeneratorInfo) -> ResolvedRequest:
    """What a generator with `info` runs for `request` (the shared rules of `klein_agent.rules.resolution`, and
    for a masked edit those of `klein_agent.rules.masks`). Raises RequestError naming the first bad argument."""
    inpaint = request.mask is not None
    if inpaint:
        check_masked_edit(info.no_masked_edits)
        if not request.references:
            raise RequestError("a masked edit needs the image to repaint")
        if request.width is not None or request.height is not None:
            raise RequestError(
                "a masked edit keeps the image's size (as the model sees it): leave width and height unset, or "
                "resize with edit first"
            )
    elif request.strength is not None:
        raise RequestError("strength applies to masked edits only: give a mask or boxes, or leave it unset")
    if request.caption is not None:
        check_flux3_only("caption", info.family)
    if request.layout:
        check_flux3_only("layout", info.family)
    resolved = resolve_request(
        request.prompt,
        request.width,
        request.height,
        request.seed,
        request.num_images,
        request.steps,
        request.guidance,
        [original_size(image) for image in request.references],
        multiple=info.size_multiple,
        distilled=info.distilled,
        default_steps=info.default_steps,
        default_guidance=limits.INPAINT_DEFAULT_GUIDANCE if inpaint else info.default_guidance,
        max_references=info.max_references,
        reference_rule=reference_rule(info.family),
    )
    loras = resolve_loras(choices(request.loras or (), info.loras, info.unloaded_loras), info.loras)
    if loras:
        resolved = replace(resolved, loras=loras)
    if request.step_cache is not None:  # checked again: a request may be built by hand
        cache = request.step_cache
        resolved = replace(resolved, step_cache=check_step_cache(cache.kind, cache.threshold))
    if request.mask is None:
        return resolved
    size = fit_mask(request.mask, request.references[0], info.size_multiple).size
    strength = check_strength(limits.DEFAULT_STRENGTH if request.strength is None else request.strength)
    start = first_step(resolved.steps, strength)
    return replace(resolved, width=size[0], height=size[1], strength=strength, first_step=start)


def reference_rule(family: str) -> ReferenceRule:
    """How the model family `family` ("flux2", "flux3") prepares references, by size (`resolution.ReferenceRule`).
    Raises ValueError for an unknown family."""
    rules: dict[str, ReferenceRule] = {"flux2": flux2_reference_sizes, "flux3": flux3_reference_sizes}
    try:
        return rules[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(rules)}") from None
