"""FLUX 3's reference preparation against diffusers' `Flux3ImageProcessor.preprocess`, tensor for tensor.

One reference is kept whole on its padded canvas (with the box to crop back to), several are centre-cropped; the
model sees exactly the tensor diffusers hands its autoencoder, so equality is the check."""

from __future__ import annotations

import pytest
import torch
from diffusers.modular_pipelines.flux3.image_processor import Flux3ImageProcessor
from test_pipeline_parity import picture

from klein_agent.pipeline.imaging import to_tensor
from klein_agent.rules.flux3_references import prepare_flux3_references

SINGLE = {
    "small": (72, 40),  # canvas 80x64, box (4, 12, 76, 52)
    "thin": (200, 12),  # a side under one token: mirrored, not reflected
    "over-4mp": (2100, 2300),  # scaled down until the rounded-up canvas fits 4 Mpx
    "exact": (64, 128),  # already on the grid: no padding
}


@pytest.mark.parametrize("size", SINGLE.values(), ids=SINGLE.keys())
def test_one_reference_on_its_canvas_equals_the_reference(size: tuple[int, int]) -> None:
    image = picture(*size, seed=3)
    want, kwargs = Flux3ImageProcessor().preprocess(image, resize_mode="fill")
    prepared = prepare_flux3_references([image])
    got = to_tensor(prepared.images[0])
    assert got.shape == want.shape
    assert torch.equal(got, want.float())
    assert prepared.crop == kwargs["reference_crop"]
    assert want.shape[-1] * want.shape[-2] <= 4 * 1024 * 1024
    assert want.shape[-1] % 16 == 0 and want.shape[-2] % 16 == 0
    if size == (72, 40):
        assert (want.shape[-1], want.shape[-2]) == (80, 64) and prepared.crop == (4, 12, 76, 52)


def test_several_references_equal_the_reference() -> None:
    images = [picture(1500, 1000, seed=1), picture(100, 70, seed=2), picture(64, 64, seed=3)]
    prepared = prepare_flux3_references(images)
    assert prepared.crop is None
    for image, ours in zip(images, prepared.images, strict=True):
        want, kwargs = Flux3ImageProcessor().preprocess(image, resize_mode="crop")
        assert kwargs["reference_crop"] is None
        assert torch.equal(to_tensor(ours), want.float())
