"""The whole pipeline against diffusers' Flux2KleinPipeline: same checkpoint folder, same seeds, fp32 on CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

import klein_agent.pipeline as pipeline_module
from klein_agent.imaging import prepare_reference
from klein_agent.pipeline import KleinPipeline, load_pipeline
from klein_agent.request import GenerationRequest

ATOL = 1e-4  # on [0, 1] pixels after 4 steps and the decoder


def picture(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8)
    return Image.frombytes("RGB", (width, height), pixels.numpy().tobytes())


@pytest.fixture(scope="module")
def ours(tiny_checkpoint: Path) -> KleinPipeline:
    return load_pipeline(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def theirs(tiny_checkpoint: Path) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Tensor]]:
    """Our decoded pixels before 8-bit rounding."""
    seen: list[torch.Tensor] = []
    original = pipeline_module.to_images

    def spy(x: torch.Tensor) -> list[Image.Image]:
        seen.append((x.float() / 2 + 0.5).clamp(0, 1))
        return original(x)

    monkeypatch.setattr(pipeline_module, "to_images", spy)
    yield seen


def run_reference(pipe: Flux2KleinPipeline, request: GenerationRequest, **extra: object) -> torch.Tensor:
    generators = [torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.num_images)]
    kwargs: dict[str, object] = dict(
        prompt=request.prompt,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps or 4,
        num_images_per_prompt=request.num_images,
        generator=generators,
        text_encoder_out_layers=(1, 2, 3),
        output_type="pt",
    )
    if request.references:
        kwargs["image"] = list(request.references)
    kwargs.update(extra)
    return pipe(**kwargs).images


CASES = {
    "text-to-image": GenerationRequest("a red cube on a blue floor", width=80, height=48, seed=7),
    "batch-of-two": GenerationRequest("two cats", width=48, height=64, seed=11, num_images=2),
    "edit": GenerationRequest(
        "make it night", width=64, height=96, seed=3, references=(picture(100, 70, 1),)
    ),
    "compose": GenerationRequest(
        "image 1 in the style of image 2",
        width=96,
        height=80,
        seed=5,
        references=(picture(100, 70, 2), picture(72, 136, 3)),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_flux2_klein_pipeline(
    case: str, ours: KleinPipeline, theirs: Flux2KleinPipeline, captured: list[torch.Tensor]
) -> None:
    request = CASES[case]
    result = ours.generate(request)
    want = run_reference(theirs, request)
    got = captured[0]
    assert got.shape == want.shape == (request.num_images, 3, request.height, request.width)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert [im.size for im in result.images] == [(request.width, request.height)] * request.num_images


def test_image_k_of_a_batch_equals_a_single_run_with_seed_plus_k(
    ours: KleinPipeline, captured: list[torch.Tensor]
) -> None:
    ours.generate(GenerationRequest("a lighthouse", width=64, height=48, seed=20, num_images=3))
    for k in range(3):
        ours.generate(GenerationRequest("a lighthouse", width=64, height=48, seed=20 + k))
        torch.testing.assert_close(captured[0][k], captured[k + 1][0], atol=1e-5, rtol=0)


def test_base_variant_uses_cfg_like_the_reference(
    tiny_base_checkpoint: Path,
    captured: list[torch.Tensor],
) -> None:
    ours = load_pipeline(str(tiny_base_checkpoint), device="cpu")
    assert not ours.info.distilled and ours.info.default_steps == 50 and ours.info.default_guidance == 4.0
    theirs = Flux2KleinPipeline.from_pretrained(str(tiny_base_checkpoint), dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    request = GenerationRequest("a teapot", width=64, height=48, seed=2, steps=3, guidance=3.5)
    ours.generate(request)
    want = run_reference(theirs, request, guidance_scale=3.5)
    torch.testing.assert_close(captured[0], want, atol=ATOL, rtol=0)
    # guidance matters: a different scale gives a different picture
    ours.generate(GenerationRequest("a teapot", width=64, height=48, seed=2, steps=3, guidance=1.5))
    assert (captured[1] - captured[0]).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(1100, 1000), (100, 70), (64, 512), (2000, 300)])
def test_reference_preparation_matches_the_reference(size: tuple[int, int]) -> None:
    image = picture(*size, seed=9)
    processor = Flux2ImageProcessor(vae_scale_factor=16)
    want = image
    if want.width * want.height > 1024 * 1024:
        want = processor._resize_to_target_area(want, 1024 * 1024)
    w, h = (want.width // 16) * 16, (want.height // 16) * 16
    want_tensor = processor.preprocess(want, height=h, width=w, resize_mode="crop")
    from klein_agent.imaging import to_tensor

    got = to_tensor(prepare_reference(image))
    torch.testing.assert_close(got, want_tensor, atol=1e-6, rtol=0)


def test_output_is_deterministic_across_loads(tiny_checkpoint: Path) -> None:
    request = GenerationRequest("same picture", width=48, height=48, seed=1)
    a = load_pipeline("tiny").generate(request).images[0].tobytes()
    b = load_pipeline(str(tiny_checkpoint)).generate(request).images[0].tobytes()
    assert a == b  # the checkpoint writer stores exactly the tiny model's weights
