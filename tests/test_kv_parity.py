"""klein 9B-KV against diffusers' Flux2KleinKVPipeline, on checkpoints diffusers itself wrote.

Both sides load the same `save_pretrained` folder (model_index.json names `Flux2KleinKVPipeline`); the reference is
called with its own defaults and given only what a user gives (prompt, CPU generators, steps, size where the case
has one, reference images). Figures: PSNR of the 8-bit pictures, at least 45 dB, and the largest difference.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import Flux2KleinKVPipeline
from PIL import ImageOps
from reference_checkpoints import Shape, load_reference, write_reference_checkpoint
from test_pipeline_parity import MIN_PSNR_DB, assert_same_pictures, picture, psnr, run_both
from tolerances import rounding_bound
from torch import Tensor

from klein_agent.pipeline import KleinPipeline, load_pipeline
from klein_agent.rules.requests import GenerationRequest

pytestmark = pytest.mark.slow  # whole KV pictures against diffusers


@pytest.fixture(scope="module")
def kv(tmp_path_factory: pytest.TempPathFactory) -> tuple[KleinPipeline, Flux2KleinKVPipeline]:
    folder = write_reference_checkpoint(tmp_path_factory.mktemp("ref-kv") / "ckpt", Shape(kv=True), seed=4)
    theirs = load_reference(folder)
    assert isinstance(theirs, Flux2KleinKVPipeline)
    return load_pipeline(str(folder)), theirs


KV_CASES = {
    "edit, 1 reference": GenerationRequest("make it night", seed=3, references=(picture(150, 100, 1),)),
    "compose, 2 references of different sizes": GenerationRequest(
        "image 1 in the style of image 2",
        seed=5,
        references=(picture(100, 70, 3), picture(72, 136, 4)),
    ),
    "compose, 4 references of different sizes, given size": GenerationRequest(
        "image 2 on image 1 with image 3 and image 4",
        96,
        80,
        seed=6,
        steps=3,
        references=(picture(64, 64, 5), picture(200, 90, 6), picture(90, 90, 7), picture(64, 112, 8)),
    ),
    "text-to-image": GenerationRequest("a red cube on a blue floor", 80, 48, seed=7),
}


@pytest.mark.parametrize("case", list(KV_CASES))
def test_kv_pictures_match_the_reference(case: str, kv: tuple[KleinPipeline, Flux2KleinKVPipeline]) -> None:
    ours, theirs = kv
    assert ours.kv_references and ours.info.variant == "custom-kv"
    assert ours.info.distilled and ours.info.default_steps == 4  # the KV pipeline's defaults: 4 steps, no CFG
    assert_same_pictures(*run_both(ours, theirs, KV_CASES[case]))


def test_the_check_catches_ordinary_reference_semantics(
    kv: tuple[KleinPipeline, Flux2KleinKVPipeline],
) -> None:
    """Running the KV checkpoint's references as ordinary klein does (current timestep, full attention) must
    fail the same check, so the cases above do test the KV semantics."""
    ours, theirs = kv
    request = KV_CASES["compose, 2 references of different sizes"]
    want = run_both(ours, theirs, request)[1]
    ours.kv_references = False
    try:
        got = ours.generate(request).images
    finally:
        ours.kv_references = True
    assert psnr(got[0], want[0]) < MIN_PSNR_DB - 5  # measured 37 dB


def test_the_kept_references_matter(kv: tuple[KleinPipeline, Flux2KleinKVPipeline]) -> None:
    """Other references (the same ones inverted) change the picture: the steps do read the kept keys and values.

    With random weights, references move the 8-bit picture only to ~54 dB (a 512-token prompt dominates the keys),
    so the picture-level cases alone would not catch every reference error: that is what the transformer-level
    test below (the kept keys and values and the velocity within float32 rounding) is for."""
    ours, _ = kv
    request = KV_CASES["compose, 2 references of different sizes"]
    inverted = tuple(ImageOps.invert(image) for image in request.references)
    other = replace(request, references=inverted)
    assert psnr(ours.generate(request).images[0], ours.generate(other).images[0]) < 60  # measured 54 dB


def test_a_kv_folder_with_a_bfl_file_keeps_kv(tmp_path: Path) -> None:
    """The folder names Flux2KleinKVPipeline: a single-file transformer swapped in stays KV."""
    from klein_agent.loading.checkpoints import is_kv_checkpoint

    assert is_kv_checkpoint({"_class_name": "Flux2KleinKVPipeline"})
    assert not is_kv_checkpoint({"_class_name": "Flux2KleinPipeline"})
    assert is_kv_checkpoint({"_class_name": "Flux2KleinPipeline"}, "/m/flux-2-klein-9b-kv.safetensors")
    assert is_kv_checkpoint({}, "/m/FLUX-2-klein-9B-KV-fp8.safetensors")
    assert not is_kv_checkpoint({}, "/m/flux-2-klein-9b.safetensors")


def test_reference_kv_and_cached_forward_match_diffusers() -> None:
    """The transformer alone, within diffusers' own float32 rounding (tests/tolerances.py: x8, measured against its
    float64 run on this CPU): our reference pass keeps the keys and values diffusers' extract pass stores
    (its layout [B, R, H, Dh]), the extract pass's velocity for the noisy tokens equals ours over [text, noisy]
    with the kept keys and values, and so does its cached pass, at another timestep."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )
    from reference_pipeline import diffusers_transformer

    from klein_agent.loading import keymaps
    from klein_agent.model import sampling
    from klein_agent.model.configs import preset
    from klein_agent.model.transformer import Flux2Transformer

    config = preset("tiny").transformer
    torch.manual_seed(0)
    ref = diffusers_transformer(config)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for block in ref.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    ours = Flux2Transformer(config).eval()
    ours.load_state_dict(keymaps.transformer_from_diffusers(ref.state_dict()), strict=True)

    grids = [(2, 4), (3, 3)]
    refs = torch.randn(1, sum(h * w for h, w in grids), config.in_channels)
    ref_ids = sampling.reference_ids(grids)
    x = torch.randn(1, 15, config.in_channels)
    ids = sampling.image_ids(3, 5)
    ctx = torch.randn(1, 9, config.context_in_dim)
    txt_ids = sampling.text_ids(9)

    def reference(model: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """diffusers' extract pass at t=0.9 and its cached pass at t=0.4, and the keys and values it kept."""
        want0, cache = model(
            hidden_states=torch.cat((refs, x), dim=1).to(dtype),
            encoder_hidden_states=ctx.to(dtype),
            timestep=torch.tensor([0.9], dtype=dtype),
            img_ids=torch.cat((ref_ids, ids)),
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
            kv_cache_mode="extract",
            num_ref_tokens=refs.shape[1],
        )
        want1 = model(
            hidden_states=x.to(dtype),
            encoder_hidden_states=ctx.to(dtype),
            timestep=torch.tensor([0.4], dtype=dtype),
            img_ids=ids,
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
            kv_cache=cache,
            kv_cache_mode="cached",
        )[0]
        kept = [c.get() for c in cache.double_block_caches + cache.single_block_caches]
        return want0, want1, [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in kept]

    with torch.no_grad():
        kept = ours.reference_kv(refs, ref_ids)
        got0 = ours(x, ids, ctx, txt_ids, torch.tensor([0.9]), reference_kv=kept)
        got1 = ours(x, ids, ctx, txt_ids, torch.tensor([0.4]), reference_kv=kept)
        want0, want1, theirs = reference(ref, torch.float32)
        want0_64, want1_64, theirs64 = reference(copy.deepcopy(ref).double(), torch.float64)
        # a real bug's size: the references' first position id moved by one changes what the blocks keep
        moved = ref_ids.clone()
        moved[0, 1] += 1
        kept_moved = ours.reference_kv(refs, moved)
        broken1 = ours(x, ids, ctx, txt_ids, torch.tensor([0.4]), reference_kv=kept_moved)
    assert kept.num_tokens == refs.shape[1] and len(theirs) == len(kept.double + kept.single)
    blocks = zip(
        kept.double + kept.single, theirs, theirs64, kept_moved.double + kept_moved.single, strict=True
    )
    for i, ((k, v), (k32, v32), (k64, v64), (k_moved, _)) in enumerate(blocks):
        keys = rounding_bound(f"block {i} keys", k64, k32)
        keys.check(k)
        keys.check_catches(k_moved, "the first reference token's position id + 1")
        rounding_bound(f"block {i} values", v64, v32).check(v)
    rounding_bound("extract pass velocity", want0_64, want0).check(got0)
    cached = rounding_bound("cached pass velocity", want1_64, want1)
    cached.check(got1)
    cached.check_catches(broken1, "the first reference token's position id + 1")


def test_memory_per_1024_reference_for_the_9b_shape() -> None:
    """Reported in docs: klein 9B keeps 2 (k, v) x 32 blocks x 4096 tokens x 4096 channels per 1024x1024
    reference, 2 GiB in bfloat16. Measured on the meta device (shapes only, no memory)."""
    from klein_agent.model import sampling
    from klein_agent.model.configs import preset
    from klein_agent.model.transformer import Flux2Transformer

    with torch.device("meta"):
        model = Flux2Transformer(preset("klein-9b-kv").transformer).to(torch.bfloat16)
        refs = torch.empty(1, 64 * 64, 128, dtype=torch.bfloat16)
        kept = model.reference_kv(refs, sampling.reference_ids([(64, 64)]).to("meta"))
    assert kept.nbytes == 2 * 1024**3


def test_the_variant_names_kv() -> None:
    from klein_agent.loading.checkpoints import detect_variant
    from klein_agent.model.configs import BASE_SAMPLING, DISTILLED_SAMPLING, preset

    nine = preset("klein-9b").transformer
    assert detect_variant(nine, DISTILLED_SAMPLING, kv=True) == "klein-9b-kv"
    assert detect_variant(nine, DISTILLED_SAMPLING) == "klein-9b"
    assert detect_variant(nine, BASE_SAMPLING) == "klein-base-9b"
    assert detect_variant(preset("klein-4b").transformer, DISTILLED_SAMPLING, kv=True) == "klein-4b-kv"
