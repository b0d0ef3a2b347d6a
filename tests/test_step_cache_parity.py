"""The step cache against diffusers' own MagCache hook, on a Base checkpoint diffusers itself wrote.

The reference is called with its defaults (50 steps, CFG 4.0 against "") plus `MagCacheConfig` with the same
threshold and step count and the only ratios it ships (`FLUX_MAG_RATIOS`): the cache settings are the one thing
both sides are given. A case only counts if the cache skipped steps and changed the picture, so a cache that did
nothing could not pass; a rule off by one step is shown to fail the same check.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.hooks import MagCacheConfig
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from PIL import Image
from reference_checkpoints import Shape, load_reference, write_reference_checkpoint
from test_pipeline_parity import MIN_PSNR_DB, picture, psnr

from klein_agent.model import step_cache
from klein_agent.pipeline import KleinPipeline, load_pipeline
from klein_agent.rules import limits
from klein_agent.rules.requests import GenerationRequest
from klein_agent.rules.step_caches import StepCache

pytestmark = pytest.mark.slow  # whole 50-step pipelines against diffusers


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KleinPipeline, Flux2KleinPipeline]]:
    folder = write_reference_checkpoint(
        tmp_path_factory.mktemp("ref-base") / "ckpt", Shape(distilled=False), seed=4
    )
    yield load_pipeline(str(folder)), load_reference(folder)


_REFERENCE_PICTURES: dict[str, Image.Image] = {}  # each 50-step reference run made once per module


def reference(theirs: Flux2KleinPipeline, case: str) -> Image.Image:
    """diffusers' picture for CASES[case] (one seed), with its MagCache hook at the case's settings."""
    if case not in _REFERENCE_PICTURES:
        _REFERENCE_PICTURES[case] = _run_reference(theirs, CASES[case], CASES[case].step_cache)
    return _REFERENCE_PICTURES[case]


def _run_reference(
    theirs: Flux2KleinPipeline, request: GenerationRequest, cache: StepCache | None
) -> Image.Image:
    steps = request.steps or limits.BASE_STEPS
    if cache is not None:
        theirs.transformer.enable_cache(
            # Only what a user of the hook must give it: the threshold, the step count its ratios are resampled
            # to, and the only ratios diffusers ships. Its skip limit and retention stay at its own defaults.
            MagCacheConfig(threshold=cache.threshold, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS)
        )
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "generator": torch.Generator("cpu").manual_seed(request.seed or 0),
    }
    if request.steps is not None:
        kwargs["num_inference_steps"] = request.steps
    if request.width is not None:
        kwargs["width"], kwargs["height"] = request.width, request.height
    if request.references:
        kwargs["image"] = list(request.references)
    try:
        return theirs(**kwargs).images[0]
    finally:
        if cache is not None:
            theirs.transformer.disable_cache()


CASES = {
    "text-to-image, 50 steps, default threshold": GenerationRequest(
        "a teapot on a table",
        64,
        48,
        seed=2,
        step_cache=StepCache("magcache", limits.STEP_CACHE_DEFAULT_THRESHOLD),
    ),
    "edit, 12 steps, threshold 0.25: the last two steps skipped": GenerationRequest(
        "make it night",
        seed=5,
        steps=12,
        references=(picture(80, 64, 8),),
        step_cache=StepCache("magcache", 0.25),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_cache_matches_diffusers_magcache(
    case: str, base: tuple[KleinPipeline, Flux2KleinPipeline]
) -> None:
    ours, theirs = base
    request = CASES[case]
    result = ours.generate(request)
    got = result.images[0]
    want = reference(theirs, case)
    db = psnr(got, want)
    diff = np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max()
    print(f"step cache parity ({case}): {db:.1f} dB, largest difference {diff} levels")
    assert db >= MIN_PSNR_DB, f"{db:.1f} dB (largest difference {diff} levels)"
    # the cache did something: both guidance passes skipped steps, and the picture is not the uncached one
    assert result.cache_hits["steps_skipped"] > 0
    uncached = ours.generate(GenerationRequest(**{**request.__dict__, "step_cache": None})).images[0]
    assert psnr(got, uncached) < MIN_PSNR_DB, "the cache changed nothing this check could see"
    assert result.recipe(0)["cache"] == {"kind": "magcache", "threshold": request.step_cache.threshold}  # type: ignore[union-attr]


def test_the_check_catches_a_rule_one_step_late(
    base: tuple[KleinPipeline, Flux2KleinPipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same case with the retention window one step longer (a plausible off-by-one) must fail the check."""
    ours, theirs = base
    case = "text-to-image, 50 steps, default threshold"
    request, want = CASES[case], reference(theirs, case)
    original = step_cache.MagCache.__init__

    def late(self: step_cache.MagCache, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.retention_step += 1

    monkeypatch.setattr(step_cache.MagCache, "__init__", late)
    got = ours.generate(request).images[0]
    assert psnr(got, want) < MIN_PSNR_DB - 3
