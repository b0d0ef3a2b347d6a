"""The masked-edit rules (klein_agent.rules.masks): boxes, mask checks, strength, and the token rule against torch."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from klein_agent.rules.masks import (
    Box,
    MaskRequest,
    boxes_mask,
    check_mask,
    check_mask_aspect,
    check_strength,
    covered_tokens,
    first_step,
    parse_box,
    prepare_mask,
    prepare_source,
)
from klein_agent.rules.requests import GenerationRequest, resolve
from klein_agent.rules.resolution import RequestError
from tests.fakes import FAKE_INFO


def test_boxes_in_pixels_and_fractions() -> None:
    mask = boxes_mask([parse_box("10,20,30,40"), parse_box("0.5,0.5,0.5,0.5")], (200, 100))
    assert mask.getbbox() == (10, 20, 200, 100)
    assert mask.getpixel((39, 59)) == 255 and mask.getpixel((40, 60)) == 0
    assert mask.getpixel((100, 50)) == 255 and mask.getpixel((99, 49)) == 0


def test_a_box_past_the_edge_is_clipped_and_one_outside_is_refused() -> None:
    assert boxes_mask([Box(150, 0, 100, 10)], (200, 100)).getbbox() == (150, 0, 200, 10)
    with pytest.raises(RequestError, match=r"box 2 .* lies outside the 200x100 image"):
        boxes_mask([Box(0, 0, 10, 10), Box(250, 0, 10, 10)], (200, 100))
    with pytest.raises(RequestError, match="not a region"):
        boxes_mask([Box(0, 0, 0, 10)], (200, 100))
    with pytest.raises(RequestError, match="X,Y,W,H"):
        parse_box("1,2,3")
    with pytest.raises(RequestError, match="no mask and no boxes"):
        boxes_mask([], (200, 100))


def test_mask_of_another_aspect_ratio_is_refused() -> None:
    check_mask_aspect((300, 200), (150, 100))
    check_mask_aspect((301, 200), (150, 100))  # within 2%
    with pytest.raises(RequestError, match=r"mask is 200x200 but the image is 150x100.*stretched"):
        check_mask_aspect((200, 200), (150, 100))


def test_empty_and_too_thin_masks_are_refused_and_a_full_mask_is_allowed() -> None:
    with pytest.raises(RequestError, match="repaints nothing"):
        check_mask(prepare_mask(Image.new("L", (64, 64), 0), (64, 64)))
    thin = Image.new("L", (64, 64), 0)
    thin.paste(255, (0, 0, 64, 6))  # rows 0-5: no token centre (rows 7-8, 23-24, ...)
    with pytest.raises(RequestError, match="too thin"):
        check_mask(thin)
    check_mask(Image.new("L", (64, 64), 255))
    assert prepare_mask(Image.new("L", (32, 32), 127), (64, 64)).getextrema() == (0, 0)
    assert prepare_mask(Image.new("L", (32, 32), 128), (64, 64)).getextrema() == (255, 255)


def test_token_rule_equals_torch_bilinear_downsampling() -> None:
    g = torch.Generator().manual_seed(0)
    for multiple in (16, 4):
        for _ in range(20):
            pixels = (torch.rand(96, 160, generator=g) > 0.995).to(torch.uint8) * 255
            mask = Image.frombytes("L", (160, 96), pixels.numpy().tobytes())
            weights = torch.nn.functional.interpolate(
                (pixels == 255).float()[None, None], size=(96 // multiple, 160 // multiple), mode="bilinear"
            )
            assert covered_tokens(mask, multiple) == int((weights > 0).sum())


def test_strength_and_the_steps_it_runs() -> None:
    assert [first_step(4, s) for s in (1.0, 0.8, 0.5, 0.3, 0.01)] == [0, 0, 2, 2, 3]
    assert first_step(50, 0.8) == 10
    for bad in (0, -0.1, 1.01):
        with pytest.raises(RequestError, match=r"strength must be above 0 and at most 1"):
            check_strength(bad)
    with pytest.raises(RequestError, match="leaves no step"):
        first_step(4, 1e-20)


def test_source_is_resized_to_whole_tokens_not_cropped() -> None:
    source = Image.new("RGB", (150, 100), (10, 20, 30))
    prepared = prepare_source(source)
    assert prepared.size == (144, 96)
    assert prepare_source(prepared) is prepared
    assert prepare_source(Image.new("RGB", (1200, 900))).size == (1168, 880)


# Sides floored to 16 change these pictures' aspect ratio by 3-8% (diffusers inpaints them at the floored size).
FLOORED = {(333, 517): (320, 512), (100, 70): (96, 64), (200, 130): (192, 128), (90, 70): (80, 64)}


@pytest.mark.parametrize("size", list(FLOORED))
def test_a_picture_whose_token_floor_changes_its_aspect_is_repainted(size: tuple[int, int]) -> None:
    """Boxes and a mask drawn at the picture's own size pass `MaskRequest.picture` and then `resolve`, whether
    the source is decoded (the CLI) or prepared (the studio): the prepared mask, at the output size, is a mask
    for this picture too."""
    output = FLOORED[size]
    raw = Image.new("RGB", size, (40, 90, 160))
    own = Image.new("L", size, 0)
    own.paste(255, (0, 0, size[0] // 2, size[1] // 2))
    for source in (raw, prepare_source(raw)):
        for region, drawn in (
            (MaskRequest(None, [Box(0, 0, 0.5, 0.5)], None), None),
            (MaskRequest("mask.png", [], None), own),
        ):
            prepared = region.picture(source, drawn)
            assert prepared.size == output
            resolved = resolve(GenerationRequest("x", seed=1, references=(source,), mask=prepared), FAKE_INFO)
            assert (resolved.width, resolved.height) == output
            # the user's own mask, as drawn, is taken by resolve too (the pipeline's parity tests pass it so)
            resolve(GenerationRequest("x", seed=1, references=(source,), mask=own), FAKE_INFO)
    # a mask truly of another shape is still refused, naming both sizes of the picture
    with pytest.raises(RequestError, match=rf"but the image is {size[0]}x{size[1]} \(the model sees it at"):
        MaskRequest("square.png", [], None).picture(raw, Image.new("L", (100, 100), 255))


def test_mask_aspect_is_checked_against_the_picture_as_given_and_as_the_model_sees_it() -> None:
    check_mask_aspect((333, 517), (333, 517), (320, 512))
    check_mask_aspect((320, 512), (333, 517), (320, 512))
    check_mask_aspect((160, 256), (333, 517), (320, 512))  # the output's shape at half size
    with pytest.raises(RequestError, match="aspect ratios differ"):
        check_mask_aspect((320, 512), (333, 517))  # without the output size, only the given one counts
    with pytest.raises(RequestError, match=r"the mask is 340x512 but the image is 333x517 \(the model sees"):
        check_mask_aspect((340, 512), (333, 517), (320, 512))  # 4.8% and 3.1% off
