"""Masked edits against diffusers' Flux2KleinInpaintPipeline on checkpoints diffusers itself wrote.

Both sides load the same `save_pretrained` folder. The reference gets only what a user gives: prompt, source image,
mask image (for boxes, the mask they make), reference image, seed (CPU generators), and steps, strength or
guidance when the case sets them; everything else is its own default (strength 0.8, guidance 8.0, 50 steps).
Figures: PSNR of the 8-bit pictures, at least 45 dB, printed with the largest difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import Flux2KleinInpaintPipeline
from PIL import Image, ImageDraw
from reference_checkpoints import Shape, write_reference_checkpoint
from test_pipeline_parity import MIN_PSNR_DB, assert_same_pictures, picture, psnr

from klein_agent.pipeline import KleinPipeline, load_pipeline
from klein_agent.rules.masks import Box, MaskRequest, boxes_mask, prepare_source
from klein_agent.rules.requests import GenerationRequest

pytestmark = pytest.mark.slow  # whole masked edits against diffusers, Base at 50 steps included

Pair = tuple[KleinPipeline, Flux2KleinInpaintPipeline]


def ellipse_mask(width: int, height: int, mode: str = "L") -> Image.Image:
    """White ellipse (repaint) on black, with soft grey edges so the binarization matters."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width * 0.2, height * 0.25, width * 0.75, height * 0.9), fill=255)
    grey = Image.new("L", (width, height), 0)
    ImageDraw.Draw(grey).rectangle((0, 0, width * 0.15, height * 0.3), fill=140)
    return Image.composite(grey, mask, grey).convert(mode)


def load_inpaint_reference(folder: Path, dtype: torch.dtype | None = None) -> Flux2KleinInpaintPipeline:
    kwargs = {} if dtype is None else {"dtype": dtype}
    pipe = Flux2KleinInpaintPipeline.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(
    ours: KleinPipeline, theirs: Flux2KleinInpaintPipeline, request: GenerationRequest
) -> tuple[list[Image.Image], list[Image.Image]]:
    got = ours.generate(request).images
    assert request.seed is not None and request.mask is not None
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "image": request.references[0],
        "mask_image": request.mask,
        "generator": [
            torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.num_images)
        ],
    }
    if request.num_images > 1:
        kwargs["num_images_per_prompt"] = request.num_images
    if len(request.references) > 1:
        kwargs["image_reference"] = request.references[1]
    if request.steps is not None:
        kwargs["num_inference_steps"] = request.steps
    if request.guidance is not None:
        kwargs["guidance_scale"] = request.guidance
    if request.strength is not None:
        kwargs["strength"] = request.strength
    want = theirs(**kwargs).images
    return got, want


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    folder = write_reference_checkpoint(
        tmp_path_factory.mktemp("inpaint-distilled") / "ckpt", Shape(), seed=0
    )
    return load_pipeline(str(folder)), load_inpaint_reference(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    folder = write_reference_checkpoint(
        tmp_path_factory.mktemp("inpaint-base") / "ckpt", Shape(distilled=False, single_blocks=1), seed=1
    )
    return load_pipeline(str(folder)), load_inpaint_reference(folder)


SOURCE = picture(150, 100, 1)  # not whole tokens: the reference resizes it to 144x96
DISTILLED_CASES = {
    "mask, default strength": GenerationRequest(
        "a red ball", seed=3, steps=4, references=(SOURCE,), mask=ellipse_mask(150, 100)
    ),
    "larger RGB mask, strength 0.5 (2 of 4 steps)": GenerationRequest(
        "a red ball", seed=4, steps=4, strength=0.5, references=(SOURCE,), mask=ellipse_mask(300, 200, "RGB")
    ),
    "with a reference image": GenerationRequest(
        "the ball from image 2",
        seed=5,
        steps=4,
        strength=0.7,
        references=(SOURCE, picture(90, 120, 2)),
        mask=ellipse_mask(150, 100),
    ),
    "boxes in pixels and fractions, batch of two": GenerationRequest(
        "two boxes",
        seed=6,
        steps=3,
        num_images=2,
        references=(SOURCE,),
        mask=boxes_mask([Box(10, 10, 40, 50), Box(0.5, 0.4, 0.3, 0.5)], SOURCE.size),
    ),
    "source over 1 Mpx, full mask": GenerationRequest(
        "everything",
        seed=7,
        steps=2,
        strength=0.9,
        references=(picture(1200, 900, 3),),
        mask=Image.new("L", (400, 300), 255),
    ),
}


@pytest.mark.parametrize("case", list(DISTILLED_CASES))
def test_distilled_masked_edits_match_the_reference(case: str, distilled: Pair) -> None:
    assert_same_pictures(*run_both(*distilled, DISTILLED_CASES[case]))


# Sides floored to 16 change the aspect by 3-8% here; the reference inpaints at the floored size.
FLOORED_CASES = {
    "333x517 by a box (320x512)": (
        picture(333, 517, 8),
        MaskRequest(None, [Box(40, 60, 200, 250)], None),
        None,
    ),
    "100x70 by a mask of its own size (96x64)": (
        picture(100, 70, 9),
        MaskRequest("m", [], None),
        ellipse_mask(100, 70),
    ),
}


@pytest.mark.parametrize("case", list(FLOORED_CASES))
def test_pictures_whose_token_floor_changes_their_aspect_match_the_reference(
    case: str, distilled: Pair
) -> None:
    """The path the CLI and the studio take: the source prepared, the mask checked and prepared by
    `MaskRequest.picture`. The reference gets the picture and the mask as the user gave them (boxes drawn at the
    picture's size) and its own defaults but for the seed and the steps."""
    ours, theirs = distilled
    raw, region, drawn = FLOORED_CASES[case]
    source = prepare_source(raw)
    request = GenerationRequest(
        "a red ball", seed=8, steps=4, references=(source,), mask=region.picture(source, drawn)
    )
    got = ours.generate(request).images
    want = theirs(
        prompt="a red ball",
        image=raw,
        mask_image=drawn if drawn is not None else boxes_mask(region.boxes, raw.size),
        generator=torch.Generator("cpu").manual_seed(8),
        num_inference_steps=4,
    ).images
    assert got[0].size == source.size
    assert_same_pictures(got, want)


def test_the_check_catches_a_wrong_mask(distilled: Pair) -> None:
    """The inverted mask (repaint what should be kept) must fail the parity check: the mask decides the pixels."""
    ours, theirs = distilled
    request = DISTILLED_CASES["mask, default strength"]
    want = run_both(ours, theirs, request)[1]
    inverted = Image.eval(request.mask.convert("L"), lambda v: 255 - v)  # type: ignore[union-attr]
    got = ours.generate(
        GenerationRequest(
            request.prompt, seed=request.seed, steps=4, references=request.references, mask=inverted
        )
    ).images
    assert psnr(got[0], want[0]) < MIN_PSNR_DB - 10


def test_base_model_with_every_reference_default(base: Pair) -> None:
    """No steps, guidance or strength: the reference's 50 steps, CFG 8.0 and strength 0.8 (40 steps run)."""
    ours, theirs = base
    request = GenerationRequest(
        "a teapot", seed=2, references=(picture(64, 80, 4),), mask=ellipse_mask(64, 80)
    )
    assert ours.resolve(request).guidance == 8.0 and ours.resolve(request).first_step == 10
    assert_same_pictures(*run_both(ours, theirs, request))


def test_base_model_with_a_reference_image_and_guidance(base: Pair) -> None:
    ours, theirs = base
    request = GenerationRequest(
        "a teapot like image 2",
        seed=3,
        steps=6,
        guidance=2.5,
        strength=0.6,
        references=(picture(96, 64, 5), picture(64, 64, 6)),
        mask=ellipse_mask(96, 64),
    )
    assert_same_pictures(*run_both(ours, theirs, request))


def test_bfloat16_masked_edit_matches_the_reference(tmp_path: Path) -> None:
    folder = write_reference_checkpoint(tmp_path / "ckpt", Shape(), seed=3)
    ours = load_pipeline(str(folder), dtype="bfloat16")
    theirs = load_inpaint_reference(folder, torch.bfloat16)
    request = GenerationRequest(
        "an edit",
        seed=3,
        steps=4,
        strength=0.75,
        references=(SOURCE, picture(64, 96, 2)),
        mask=ellipse_mask(150, 100),
    )
    assert_same_pictures(*run_both(ours, theirs, request))
