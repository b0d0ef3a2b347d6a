"""FLUX 3 [klein] LoRA files: read by our loader as diffusers' `Flux3LoraLoaderMixin` reads them, strictly.

Parity: one checkpoint written by diffusers (tests/flux3_reference_checkpoints.py), one LoRA file per format
(diffusers/PEFT `transformer.` names with alpha in the metadata; BFL's `diffusion_model.` names, which diffusers
converts with `_convert_non_diffusers_flux3_lora_to_diffusers`), loaded by diffusers' own `load_lora_weights` on
its modular pipeline (default adapter, scale 1) and by ours: ≥ 45 dB on the 8-bit pictures, and the picture without
the adapter must be far from it (so the check can fail). Strictness: names diffusers' model has no layer for, shapes
that do not fit, LoKr files (diffusers reads none for FLUX 3) and FLUX.2 adapters are refused naming file and key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flux3_reference_checkpoints import Flux3Shape, load_flux3_reference, write_flux3_checkpoint
from safetensors.torch import save_file
from test_flux3_transformer import diffusers_flux3
from test_pipeline_parity import MIN_PSNR_DB, picture, psnr

from klein_agent.loading import flux3_keymaps
from klein_agent.loading.flux3_checkpoints import load_flux3_components
from klein_agent.loading.lora import LoRAError, read_lora
from klein_agent.model import lora
from klein_agent.model.configs import Flux3TransformerConfig, preset
from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.model.lora import LowRank
from klein_agent.pipeline.flux3 import Flux3Pipeline
from klein_agent.rules.loras import MAX_LORA_SCALE

RANK = 4
SHAPE = (
    Flux3Shape()
)  # hidden 32 (2 heads of 16), MLP 96 (linear_in 2 x 96), context 8 x 32, 16 latent channels
D, FF, CTX, T = 32, 96, 256, 256
TINY = preset("flux3-tiny").transformer
assert isinstance(TINY, Flux3TransformerConfig)

# diffusers names, one of each kind of layer: mode blocks of each mode, joint blocks, embedders, modulations, output
DIFFUSERS_LAYERS = {
    "mode_blocks.image.0.attn.to_q": (D, D),
    "mode_blocks.image_cond.1.attn.to_v": (D, D),
    "txt_mode_blocks.0.attn.to_k": (D, D),
    "txt_mode_blocks.1.ff.linear_in": (2 * FF, D),
    "single_transformer_blocks.0.attn.to_out.0": (D, D),
    "single_transformer_blocks.1.ff.linear_out": (D, FF),
    "norm_out.linear": (2 * D, D),  # [scale; shift] in diffusers, [shift; scale] in ours
    "context_embedder": (D, CTX),
    "x_embedders.image": (D, 16),
    "single_stream_modulations.txt.linear": (3 * D, D),
    "early_stream_modulations.image.linear": (3 * D, D),
    "timestep_embedder.linear_1": (D, T),
    "target_timestep_embedder.linear_2": (D, D),
}
# BFL names (diffusion_model.), inside the blocks: the part diffusers' converter renames
BFL_LAYERS = {
    "content_mode_blocks.image.0.q_proj": (D, D),
    "content_mode_blocks.image_cond.0.mlp_in": (2 * FF, D),
    "content_mode_blocks.image_cond.1.k_proj": (D, D),
    "txt_mode_blocks.1.attn_out": (D, D),
    "single_blocks.0.k_proj": (D, D),
    "single_blocks.1.mlp_out": (D, FF),
}


def low_rank(out_f: int, in_f: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(RANK, in_f, generator=g) * in_f**-0.5, torch.randn(
        out_f, RANK, generator=g
    ) * RANK**-0.5


def write(
    path: Path, layers: dict[str, tuple[int, int]], prefix: str, seed: int, alpha: float | None = None
) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in layers.items():
        tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"] = low_rank(
            out_f, in_f, g
        )
    metadata = None
    if alpha is not None:  # as diffusers' save_lora_weights packs a PEFT LoraConfig
        config = {
            "transformer.r": RANK,
            "transformer.lora_alpha": alpha,
            "transformer.target_modules": sorted(layers),
        }
        metadata = {"lora_adapter_metadata": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_our_diffusers_names_are_diffusers_linear_layers() -> None:
    """Every linear layer of ours has exactly one diffusers name, and it is a linear layer of diffusers' model."""
    ours = Flux3Transformer(TINY)
    linears = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)]
    table = flux3_keymaps.lora_layers_from_diffusers(linears)
    theirs = {n for n, m in diffusers_flux3(TINY).named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(table) == theirs
    assert sorted(ours_name for ours_name, _ in table.values()) == sorted(linears)
    assert [k for k, (_, swap) in table.items() if swap] == ["norm_out.linear"]


CASES = {
    # (file layers, key prefix, alpha in metadata, references)
    "diffusers-t2i": (DIFFUSERS_LAYERS, "transformer.", 8.0, 0),
    "bfl-edit": (BFL_LAYERS, "diffusion_model.", None, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_pictures_match_diffusers_load_lora_weights(name: str, tmp_path: Path) -> None:
    layers, prefix, alpha, refs = CASES[name]
    folder = write_flux3_checkpoint(tmp_path / "ckpt", SHAPE)
    path = write(tmp_path / "adapter.safetensors", layers, prefix, seed=3, alpha=alpha)
    ref = load_flux3_reference(folder, distilled=True)
    ref.load_lora_weights(str(path))  # diffusers' own loader, its defaults (adapter "default_0", scale 1)
    parts = load_flux3_components(folder, torch.device("cpu"), torch.float32)
    adapter = read_lora(path, parts.transformer, max_scale=MAX_LORA_SCALE)
    assert len(adapter.updates) == len(layers)
    lora.attach(parts.transformer, "a", adapter.updates)
    lora.activate(parts.transformer, [("a", 1.0)])
    ours = Flux3Pipeline(parts.transformer, parts.autoencoder, parts.text_embedder, parts.sampling)

    prompt, seed = "a lighthouse on a cliff at dusk", 7
    images = [picture(72, 40, seed=1)][:refs]
    size = {} if images else {"height": 64, "width": 96}
    inputs = {"image": images[0]} if images else {}
    want = ref(
        prompt=prompt, generator=torch.Generator().manual_seed(seed), output="images", **size, **inputs
    )
    got = ours.pictures(prompt, [seed], references=images, **size)
    db = psnr(got[0], want[0])
    lora.activate(parts.transformer, [])
    without = psnr(ours.pictures(prompt, [seed], references=images, **size)[0], want[0])
    print(f"{name}: {db:.1f} dB with the adapter; {without:.1f} dB without it")
    assert db >= MIN_PSNR_DB
    assert (
        without < MIN_PSNR_DB
    )  # the adapter moves the picture, so the equality above says it is applied alike


def test_bfl_and_diffusers_names_give_the_same_updates(tmp_path: Path) -> None:
    """The same layers named both ways (the output modulation's halves swapped between them, as the base weights
    are), and kohya's flattened BFL names, read to the same updates; BFL keys outside the blocks (diffusers' converter
    leaves them unrenamed) reach our layers."""
    model = Flux3Transformer(TINY)
    d, ctx = TINY.hidden_size, TINY.context_in_dim
    g = torch.Generator().manual_seed(0)
    pairs = {"txt_in": low_rank(d, ctx, g), "final_layer.image.adaLN_modulation.1": low_rank(2 * d, d, g)}
    pairs["single_blocks.1.v_proj"] = low_rank(d, d, g)
    theirs = {"txt_in": "context_embedder", "final_layer.image.adaLN_modulation.1": "norm_out.linear"}
    theirs["single_blocks.1.v_proj"] = "single_transformer_blocks.1.attn.to_v"
    bfl, diff, kohya = {}, {}, {}
    for name, (down, up) in pairs.items():
        bfl[f"diffusion_model.{name}.lora_A.weight"], bfl[f"diffusion_model.{name}.lora_B.weight"] = down, up
        if name.startswith("final_layer"):
            up = torch.cat(up.chunk(2)[::-1])  # diffusers' order for the same update
        (
            diff[f"transformer.{theirs[name]}.lora_A.weight"],
            diff[f"transformer.{theirs[name]}.lora_B.weight"],
        ) = down, up
        flat = "lora_unet_" + name.replace(".", "_")
        kohya[f"{flat}.lora_down.weight"], kohya[f"{flat}.lora_up.weight"] = pairs[name]
        kohya[f"{flat}.alpha"] = torch.tensor(float(RANK))
    read = {}
    for fmt, tensors in (("ai-toolkit", bfl), ("diffusers", diff), ("kohya", kohya)):
        save_file(tensors, str(tmp_path / f"{fmt}.safetensors"))
        adapter = read_lora(tmp_path / f"{fmt}.safetensors", model, max_scale=MAX_LORA_SCALE)
        assert adapter.format == fmt
        read[fmt] = adapter.updates
    assert set(read["diffusers"]) == set(pairs)
    for fmt in ("ai-toolkit", "kohya"):
        for layer, update in read["diffusers"].items():
            other = read[fmt][layer]
            assert isinstance(update, LowRank) and isinstance(other, LowRank)
            assert torch.equal(update.matrix(), other.matrix()), (fmt, layer)


def _refused(path: Path, model: torch.nn.Module, key: str, words: str) -> None:
    with pytest.raises(LoRAError) as refused:
        read_lora(path, model, max_scale=MAX_LORA_SCALE)
    message = str(refused.value)
    print(message)
    assert message.startswith(f"LoRA {path}, key {key!r}: ") and words in message, message


HOSTILE = {
    # a FLUX.2 [klein] adapter (fused qkv) on FLUX 3
    "flux2-ai-toolkit": ("diffusion_model.double_blocks.0.img_attn.qkv", (3 * 64, 64), "names no layer"),
    "flux2-diffusers": ("transformer.transformer_blocks.0.attn.add_q_proj", (64, 64), "names no layer"),
    # a block past the model's depth, in either layout
    "past-depth-bfl": ("diffusion_model.single_blocks.7.q_proj", (64, 64), "names no layer"),
    "past-depth-diffusers": ("transformer.mode_blocks.image.5.attn.to_q", (64, 64), "names no layer"),
    # BFL's name where the file is in diffusers' layout (diffusers has no layer of that name and drops it)
    "bfl-name-under-transformer": ("transformer.txt_in", (64, 256), "names no layer"),
    # a shape that does not fit: mlp_in is 64 -> 2 x 192
    "wrong-shape": ("transformer.txt_mode_blocks.0.ff.linear_in", (192, 64), "do not fit"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_adapters_for_another_shape_or_model_are_refused(case: str, tmp_path: Path) -> None:
    layer, (out_f, in_f), words = HOSTILE[case]
    down, up = low_rank(out_f, in_f, torch.Generator().manual_seed(1))
    path = tmp_path / "bad.safetensors"
    save_file({f"{layer}.lora_A.weight": down, f"{layer}.lora_B.weight": up}, str(path))
    _refused(path, Flux3Transformer(TINY), f"{layer}.lora_A.weight", words)


def test_values_and_duplicates_are_refused_as_for_flux2(tmp_path: Path) -> None:
    model = Flux3Transformer(TINY)
    g = torch.Generator().manual_seed(2)
    down, up = low_rank(64, 64, g)
    key = "diffusion_model.single_blocks.0.q_proj"
    nan = up.clone()
    nan[3, 1] = float("nan")
    save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": nan}, str(tmp_path / "nan.safetensors"))
    _refused(tmp_path / "nan.safetensors", model, f"{key}.lora_B.weight", "NaN")
    huge = up * 1e30
    save_file(
        {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": huge}, str(tmp_path / "huge.safetensors")
    )
    _refused(tmp_path / "huge.safetensors", model, f"{key}.lora_A.weight", "float16's range")
    same = "diffusion_model.single_transformer_blocks.0.attn.to_q"  # the same layer by its diffusers name
    both = {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    both |= {f"{same}.lora_A.weight": down.clone(), f"{same}.lora_B.weight": up.clone()}
    save_file(both, str(tmp_path / "twice.safetensors"))
    _refused(tmp_path / "twice.safetensors", model, f"{key}.lora_A.weight", "given twice")


def test_lokr_files_are_refused_for_flux3(tmp_path: Path) -> None:
    key = "diffusion_model.single_blocks.0.q_proj.lokr_w1"
    save_file(
        {key: torch.ones(8, 8), key.replace("w1", "w2"): torch.ones(8, 8)}, str(tmp_path / "k.safetensors")
    )
    _refused(tmp_path / "k.safetensors", Flux3Transformer(TINY), key, "LoKr adapters are read for FLUX.2")
