"""What a caller asks the model for, and the interface every image generator offers.

This module imports no torch: the store, the server's validation code and test fakes depend on it, and they must
stay light. The real implementation is `klein_agent.pipeline.KleinPipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

# progress(done, total, message): `done` rises strictly from 1 to `total` during one `generate` call.
# The units are: 1 for conditioning (prompt and references), one per denoising step, 1 for decoding.
# A callback that raises stops the run at the next unit boundary; the exception propagates unchanged and
# nothing is returned. That is how the engine cancels a call between denoising steps.
ProgressCallback = Callable[[int, int, str], None]

MULTIPLE = 16  # output sizes are multiples of 16 px: the autoencoder's 8x times the 2x2 latent patch


@dataclass(frozen=True)
class GenerationRequest:
    """One call: text-to-image with no references, an edit with one, a composition with several."""

    prompt: str
    width: int
    height: int
    seed: int
    num_images: int = 1  # images use seeds seed, seed+1, ...; image k equals a single run with seed+k
    steps: int | None = None  # None: the model's default (4 for distilled klein, 50 for Base)
    guidance: float | None = None  # None: the model's default; distilled models ignore it
    references: tuple[Image.Image, ...] = field(default=(), compare=False)  # RGB, in "image 1, image 2" order


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]  # RGB, width x height, one per seed
    timings_ms: dict[
        str, float
    ]  # e.g. {"text": .., "references": .., "denoise": .., "decode": .., "total": ..}
    cache_hits: dict[str, int]  # {"prompt": 0 or 1, "references": n hits}


@dataclass(frozen=True)
class GeneratorInfo:
    model: str  # what the user named: a folder, a repo id, or "tiny"
    variant: str  # preset name, e.g. "klein-4b", "klein-base-9b", "tiny"
    device: str
    dtype: str
    distilled: bool
    default_steps: int
    default_guidance: float
    max_references: int


class ImageGenerator(Protocol):
    info: GeneratorInfo

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run one request to completion on the calling thread. Not thread-safe: one caller at a time."""
        ...
