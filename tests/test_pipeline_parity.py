"""The whole pipeline against diffusers' Flux2KleinPipeline on checkpoints diffusers itself wrote.

Both sides load the same `save_pretrained` folder; the reference is called with its own defaults (its text layers,
its size rule, its preprocessing), given only what a user gives: prompt, seed (as CPU generators), steps, size when
the case has one, and reference images. Figures: PSNR of the 8-bit pictures, at least 45 dB (identical pictures
report inf), and the largest difference in 8-bit levels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from reference_checkpoints import Shape, load_reference, write_reference_checkpoint

from klein_agent.pipeline import KleinPipeline, load_pipeline
from klein_agent.rules.requests import GenerationRequest

pytestmark = pytest.mark.slow  # whole pipelines against diffusers, many cases

MIN_PSNR_DB = 45.0


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert x.shape == y.shape, (a.size, b.size)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields plus noise: something an autoencoder encodes into varied latents."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([xs, ys, (xs + ys) / 2], dim=-1) * 200
    pixels = (base + torch.rand(height, width, 3, generator=g) * 55).clamp(0, 255).to(torch.uint8)
    return Image.frombytes("RGB", (width, height), pixels.numpy().tobytes())


def run_both(
    ours: KleinPipeline, theirs: Flux2KleinPipeline, request: GenerationRequest
) -> tuple[list[Image.Image], list[Image.Image]]:
    got = ours.generate(request).images
    kwargs: dict[str, Any] = {"prompt": request.prompt}
    seeds = [request.seed + k for k in range(request.num_images)]  # type: ignore[operator]
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if request.num_images > 1:
        kwargs["num_images_per_prompt"] = request.num_images
    if request.steps is not None:
        kwargs["num_inference_steps"] = request.steps
    if request.guidance is not None:
        kwargs["guidance_scale"] = request.guidance
    if request.width is not None:
        kwargs["width"], kwargs["height"] = request.width, request.height
    if request.references:
        kwargs["image"] = list(request.references)
    want = theirs(**kwargs).images
    return got, want


def assert_same_pictures(got: list[Image.Image], want: list[Image.Image]) -> None:
    assert [g.size for g in got] == [w.size for w in want]
    for g, w in zip(got, want, strict=True):
        db = psnr(g, w)
        diff = np.abs(np.asarray(g, dtype=int) - np.asarray(w, dtype=int)).max()
        print(f"parity: {db:.1f} dB, largest difference {diff} levels, {g.size[0]}x{g.size[1]}")
        assert db >= MIN_PSNR_DB, f"{db:.1f} dB (largest difference {diff} levels)"
        assert np.asarray(g).std() > 5  # a real picture, not a flat one both sides agree on


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> tuple[KleinPipeline, Flux2KleinPipeline]:
    folder = write_reference_checkpoint(tmp_path_factory.mktemp("ref-distilled") / "ckpt", Shape(), seed=0)
    return load_pipeline(str(folder)), load_reference(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[KleinPipeline, Flux2KleinPipeline]:
    folder = write_reference_checkpoint(
        tmp_path_factory.mktemp("ref-base") / "ckpt", Shape(distilled=False, single_blocks=1), seed=1
    )
    return load_pipeline(str(folder)), load_reference(folder)


@pytest.fixture(scope="module")
def unusual(tmp_path_factory: pytest.TempPathFactory) -> tuple[KleinPipeline, Flux2KleinPipeline]:
    """27 text layers (the reference reads layer 27 after the final norm), 1 double and 4 single blocks, 4 heads,
    a 2-level autoencoder (4 px tokens) without quant convs or mid attention and with a narrower decoder."""
    shape = Shape(
        text_layers=27,
        double_blocks=1,
        single_blocks=4,
        heads=4,
        head_dim=8,
        vae_channels=(8, 16),
        decoder_channels=(8, 8),
        latent_channels=2,
        norm_groups=4,
        quant_convs=False,
        mid_attention=False,
    )
    folder = write_reference_checkpoint(tmp_path_factory.mktemp("ref-unusual") / "ckpt", shape, seed=2)
    return load_pipeline(str(folder)), load_reference(folder)


DISTILLED_CASES = {
    "text-to-image, non-square": GenerationRequest("a red cube on a blue floor", 80, 48, seed=7, steps=4),
    "batch of two": GenerationRequest("two cats", 48, 64, seed=11, num_images=2, steps=4),
    "edit, size from the reference": GenerationRequest(
        "make it night", seed=3, steps=4, references=(picture(150, 100, 1),)
    ),
    "edit, reference over 1 Mpx": GenerationRequest(
        "make it night", seed=4, steps=2, references=(picture(1200, 900, 2),)
    ),
    "compose, references of different sizes": GenerationRequest(
        "image 1 in the style of image 2",
        seed=5,
        steps=4,
        references=(picture(100, 70, 3), picture(72, 136, 4)),
    ),
    "compose, given size": GenerationRequest(
        "image 2 on image 1",
        96,
        80,
        seed=6,
        steps=3,
        references=(picture(64, 64, 5), picture(200, 90, 6), picture(90, 90, 7)),
    ),
}


@pytest.mark.parametrize("case", list(DISTILLED_CASES))
def test_distilled_pictures_match_the_reference(
    case: str, distilled: tuple[KleinPipeline, Flux2KleinPipeline]
) -> None:
    assert_same_pictures(*run_both(*distilled, DISTILLED_CASES[case]))


def test_the_check_catches_a_wrong_text_layer_rule(
    distilled: tuple[KleinPipeline, Flux2KleinPipeline],
) -> None:
    """The old rule (quarter points of the depth: 7/14/21 for 28 layers) must fail these checks."""
    ours, theirs = distilled
    request = DISTILLED_CASES["text-to-image, non-square"]
    want = run_both(ours, theirs, request)[1]
    ours.text_embedder.output_layers = (7, 14, 21)
    ours.clear_caches()
    try:
        got = ours.generate(request).images
    finally:
        ours.text_embedder.output_layers = (9, 18, 27)
        ours.clear_caches()
    assert psnr(got[0], want[0]) < MIN_PSNR_DB - 10


def test_base_model_with_every_reference_default(base: tuple[KleinPipeline, Flux2KleinPipeline]) -> None:
    """No steps, no guidance: the reference's defaults (50 steps, CFG 4.0) are the Base model's."""
    ours, theirs = base
    assert not ours.info.distilled and ours.info.default_steps == 50 and ours.info.default_guidance == 4.0
    assert_same_pictures(*run_both(ours, theirs, GenerationRequest("a teapot", 64, 48, seed=2)))


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_base_model_guidance_matches(base: tuple[KleinPipeline, Flux2KleinPipeline], guidance: float) -> None:
    """1.0 turns CFG off in the reference (it runs CFG only above 1); so it does here."""
    ours, theirs = base
    request = GenerationRequest(
        "a teapot", 48, 48, seed=3, steps=6, guidance=guidance, references=(picture(80, 64, 8),)
    )
    assert_same_pictures(*run_both(ours, theirs, request))


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest("default size: 64 tokens a side", seed=1, steps=2),
        GenerationRequest("an edit", seed=2, steps=3, references=(picture(130, 90, 9),)),
    ],
    ids=["text-to-image", "edit"],
)
def test_unusual_shapes_match_the_reference(
    unusual: tuple[KleinPipeline, Flux2KleinPipeline], request_: GenerationRequest
) -> None:
    ours, theirs = unusual
    assert ours.info.size_multiple == 4
    got, want = run_both(ours, theirs, request_)
    assert_same_pictures(got, want)
    if not request_.references:
        assert got[0].size == (256, 256)  # 64 tokens of 4 px, as the reference's default


def test_declared_text_layers_are_ignored_as_the_reference_ignores_them(tmp_path: Path) -> None:
    """Flux2KleinPipeline takes no layer list from a checkpoint (only from a call argument): neither do we."""
    folder = write_reference_checkpoint(tmp_path / "ckpt", Shape(), seed=5)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_out_layers"] = [7, 14, 21]
    (folder / "model_index.json").write_text(json.dumps(index))
    ours, theirs = load_pipeline(str(folder)), load_reference(folder)
    assert ours.text_embedder.output_layers == (9, 18, 27)
    assert_same_pictures(*run_both(ours, theirs, GenerationRequest("layers", 48, 48, seed=1, steps=2)))


def test_a_too_shallow_text_encoder_is_a_clear_error(tmp_path: Path) -> None:
    from klein_agent.loading.checkpoints import CheckpointError

    folder = write_reference_checkpoint(tmp_path / "ckpt", Shape(text_layers=20), seed=6)
    with pytest.raises(CheckpointError, match=r"has 20 layers.*layers 9, 18, 27.*at least 27"):
        load_pipeline(str(folder))


def test_bfloat16_pictures_match_the_reference(tmp_path: Path) -> None:
    """The GPU default precision, on the CPU: the state, timesteps, CFG and decode follow diffusers' dtypes, and
    tensors reach the convolutions in its memory layout, so bfloat16 rounds where the reference rounds."""
    folder = write_reference_checkpoint(tmp_path / "ckpt", Shape(), seed=3)
    ours = load_pipeline(str(folder), dtype="bfloat16")
    theirs = Flux2KleinPipeline.from_pretrained(str(folder), dtype=torch.bfloat16)
    theirs.set_progress_bar_config(disable=True)
    for request in (
        GenerationRequest("a red cube", 80, 48, seed=7, steps=4),
        GenerationRequest("an edit", seed=3, steps=4, references=(picture(150, 100, 1), picture(64, 96, 2))),
    ):
        assert_same_pictures(*run_both(ours, theirs, request))
