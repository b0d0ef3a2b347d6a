"""LoKr adapters against diffusers' `load_lora_weights` + `set_adapters`, on checkpoints diffusers itself wrote.

Each file is written in its layout's own keys: BFL's (`diffusion_model.` BFL names, q/k/v fused, as ai-toolkit
trains them), LyCORIS' (`lycoris_` + diffusers' block paths with underscores, q/k/v split) and diffusers' own
(`transformer.` + diffusers names, as PEFT holds it). Factors are shaped as peft shapes them (`factorization(dim,
4)`), so diffusers can rebuild the same LoKr config from the shapes; some are whole matrices, some rank-decomposed
with an alpha (baked into w1 as alpha / rank), one alpha sits beside whole factors (where LyCORIS ignores it). Both
sides load the same file and run the same adapters and scales. Figures: PSNR of the 8-bit pictures (at least 45 dB),
and, so the check can fail, the same picture without the adapter must be far from it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft.tuners.lokr.layer import factorization
from reference_checkpoints import Shape, write_reference_checkpoint
from safetensors.torch import save_file
from test_lora_parity import REQUESTS, kohya_file, reference_with
from test_pipeline_parity import MIN_PSNR_DB, assert_same_pictures, psnr, run_both

from klein_agent.pipeline import load_pipeline
from klein_agent.rules.requests import GenerationRequest

pytestmark = pytest.mark.slow  # whole pictures against diffusers per LoKr layout

D, FF = 32, 96  # Shape(): 2 heads of 16; mlp ratio 3 (linear_in 2 * 96)
FACTOR = 4


def lokr_layer(
    prefix: str, out_f: int, in_f: int, g: torch.Generator, w1_rank: int = 0, w2_rank: int = 0
) -> dict[str, torch.Tensor]:
    """One layer's factors as peft shapes them (w1 [a, c], w2 [b, d] from factorization(dim, FACTOR)), whole or
    rank-decomposed (`w*_rank` > 0). Sized so the update is about a trained adapter's, 0.1-0.5 of the layer."""
    (a, b), (c, d) = factorization(out_f, FACTOR), factorization(in_f, FACTOR)
    tensors = {}
    for side, rows, cols, rank, gain in (("w1", a, c, w1_rank, 1.0), ("w2", b, d, w2_rank, 0.5)):
        if rank:
            tensors[f"{prefix}.lokr_{side}_a"] = torch.randn(rows, rank, generator=g) * rank**-0.5
            tensors[f"{prefix}.lokr_{side}_b"] = torch.randn(rank, cols, generator=g) * cols**-0.5 * gain
        else:
            tensors[f"{prefix}.lokr_{side}"] = torch.randn(rows, cols, generator=g) * cols**-0.5 * gain
    return tensors


def bfl_file(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    layers = {  # name: (out, in, w2 rank, alpha)
        "double_blocks.0.img_attn.qkv": (3 * D, D, 0, None),
        "double_blocks.1.txt_attn.qkv": (3 * D, D, 2, 4.0),
        "double_blocks.0.img_attn.proj": (D, D, 0, 7.0),  # an alpha beside whole factors: ignored
        "double_blocks.1.img_mlp.0": (2 * FF, D, 2, 1.0),
        "double_blocks.0.txt_mlp.2": (D, FF, 0, None),
        "single_blocks.0.linear1": (3 * D + 2 * FF, D, 0, None),
        "single_blocks.2.linear2": (D, D + FF, 2, 2.0),
        "img_in": (D, 16, 0, None),
        "double_stream_modulation_img.lin": (6 * D, D, 0, None),
    }
    tensors = {}
    for name, (out_f, in_f, rank, alpha) in layers.items():
        tensors |= lokr_layer(f"diffusion_model.{name}", out_f, in_f, g, w2_rank=rank)
        if alpha is not None:
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def lycoris_file(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    layers = {  # name: (out, in, w1 and w2 rank, alpha)
        "transformer_blocks_0_attn_to_q": (D, D, 0, None),
        "transformer_blocks_0_attn_to_v": (D, D, 1, 2.0),  # k left out: a partial q/k/v
        "transformer_blocks_1_attn_add_k_proj": (D, D, 0, None),
        "transformer_blocks_0_attn_to_out_0": (D, D, 0, None),
        "transformer_blocks_1_ff_linear_in": (2 * FF, D, 1, 0.5),
        "single_transformer_blocks_2_attn_to_qkv_mlp_proj": (3 * D + 2 * FF, D, 0, None),
        "single_transformer_blocks_0_attn_to_out": (D, D + FF, 0, None),
    }
    tensors = {}
    for name, (out_f, in_f, rank, alpha) in layers.items():
        tensors |= lokr_layer(f"lycoris_{name}", out_f, in_f, g, w1_rank=rank, w2_rank=rank)
        if alpha is not None:
            tensors[f"lycoris_{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def diffusers_file(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    layers = {
        "transformer_blocks.1.attn.to_k": (D, D),
        "transformer_blocks.0.attn.add_v_proj": (D, D),
        "transformer_blocks.1.ff_context.linear_out": (D, FF),
        "norm_out.linear": (2 * D, D),  # [scale; shift] in diffusers, [shift; scale] in ours
        "context_embedder": (D, 96),
    }
    tensors = {}
    for name, (out_f, in_f) in layers.items():
        tensors |= lokr_layer(f"transformer.{name}", out_f, in_f, g)
    save_file(tensors, str(path))
    return path


WRITERS = {"BFL LoKr": bfl_file, "LyCORIS LoKr": lycoris_file, "diffusers LoKr": diffusers_file}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reference_checkpoint(tmp_path_factory.mktemp("lokr-ref") / "ckpt", Shape(), seed=0)


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_lokr_layout_matches_diffusers(fmt: str, folder: Path, tmp_path: Path) -> None:
    path = WRITERS[fmt](tmp_path / f"{fmt.split()[0]}.safetensors", seed=1)
    ours = load_pipeline(str(folder), loras=[(str(path), 0.8)])
    assert ours.adapters[path.stem].format == fmt
    theirs = reference_with(folder, [path], [0.8])
    plain = load_pipeline(str(folder))
    for request in REQUESTS:
        got, want = run_both(ours, theirs, replace(request, loras=ours.info.loras))
        assert_same_pictures(got, want)
        assert psnr(plain.generate(request).images[0], want[0]) < MIN_PSNR_DB - 10  # the adapter matters


def test_a_lora_and_a_lokr_at_once_match_diffusers(folder: Path, tmp_path: Path) -> None:
    lora = kohya_file(tmp_path / "subject.safetensors", seed=3)
    lokr = lycoris_file(tmp_path / "style.safetensors", seed=2)
    ours = load_pipeline(str(folder), loras=[(str(lora), -0.5), (str(lokr), 1.3)])
    theirs = reference_with(folder, [lora, lokr], [-0.5, 1.3])
    assert ours.info.loras == (("subject", -0.5), ("style", 1.3))
    assert_same_pictures(*run_both(ours, theirs, replace(REQUESTS[0], loras=ours.info.loras)))


def test_per_call_lokr_choice_equals_a_pipeline_loaded_with_only_that_adapter(
    folder: Path, tmp_path: Path
) -> None:
    """LoKr adapters switch per call without touching the base weights: none, one, the other, back."""
    a = bfl_file(tmp_path / "a.safetensors", seed=4)
    b = lycoris_file(tmp_path / "b.safetensors", seed=5)
    both = load_pipeline(str(folder), loras=[(str(a), 1.0), (str(b), 1.0)])
    only_b = load_pipeline(str(folder), loras=[(str(b), 0.7)])
    plain = load_pipeline(str(folder))
    base = GenerationRequest("a cube", 48, 48, seed=1, steps=2)
    for _ in range(2):
        got = both.generate(replace(base, loras=(("b", 0.7),))).images[0]
        assert got.tobytes() == only_b.generate(replace(base, loras=only_b.info.loras)).images[0].tobytes()
        none = both.generate(base).images[0]  # no choice runs none
        assert none.tobytes() == plain.generate(base).images[0].tobytes()
        assert both.generate(replace(base, loras=(("a", 1.0),))).images[0].tobytes() != none.tobytes()
