"""What a caller asks the model for, and the interface every image generator offers.

This module imports no torch: the store, the server's validation code and test fakes depend on it, and they must
stay light. The real implementation is `klein_agent.pipeline.KleinPipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from klein_agent.rules.references import original_size
from klein_agent.rules.resolution import ResolvedRequest, resolve_request

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
    steps: int | None = None  # None: the model's default (4 for distilled klein, 50 for Base)
    guidance: float | None = None  # None: the model's default; distilled models take none
    references: tuple[Image.Image, ...] = field(default=(), compare=False)  # RGB, in "image 1, image 2" order


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or infinite values; nothing usable was made. The message names the likely cause."""


@dataclass(frozen=True)
class GenerationResult:
    """The pictures of one `generate` call, what ran to make them, and how long each stage took (ms)."""

    images: list[Image.Image]  # RGB, width x height, one per seed
    timings_ms: dict[str, float]  # {"text", "references", "denoise", "decode", "total"}
    # {"prompt": 0 or 1, "references": n hits}, and for klein 9B-KV "reference_kv": 0 or 1
    cache_hits: dict[str, int]
    resolved: ResolvedRequest  # what ran: size, seeds, steps, guidance, references as prepared
    info: GeneratorInfo  # the model that ran it

    def recipe(self, k: int) -> dict[str, Any]:
        """What decides the pixels of image k: re-running it (num_images 1) gives the same PNG bytes."""
        r = self.resolved
        return {
            "prompt": r.prompt,
            "seed": r.seeds[k],
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance": r.guidance,
            "model": self.info.model,
            "variant": self.info.variant,
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
    size_multiple: int = 16  # px per latent token side; prepared references and outputs are multiples of it


class ImageGenerator(Protocol):
    """What the engine, the CLI and test fakes need of a model: its `info` and `generate`."""

    info: GeneratorInfo

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run one request to completion on the calling thread. Not thread-safe: one caller at a time."""
        ...


def resolve(request: GenerationRequest, info: GeneratorInfo) -> ResolvedRequest:
    """What a generator with `info` runs for `request` (the shared rules of `klein_agent.rules.resolution`)."""
    return resolve_request(
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
        default_guidance=info.default_guidance,
        max_references=info.max_references,
    )
