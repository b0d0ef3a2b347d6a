"""LoRA adapters against diffusers' `load_lora_weights` + `set_adapters`, on checkpoints diffusers itself wrote.

Each file is written with its format's own key layout (diffusers/PEFT names with split q/k/v, kohya's flattened
BFL names with lora_down/lora_up/alpha, ai-toolkit's `diffusion_model.` BFL names with fused q/k/v); both sides
load the same file and run the same adapters and scales. Figures: PSNR of the 8-bit pictures (at least 45 dB),
and, so the check can fail, the same picture without the adapter must be far from it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline
from reference_checkpoints import Shape, load_reference, write_reference_checkpoint
from safetensors.torch import save_file
from test_pipeline_parity import MIN_PSNR_DB, assert_same_pictures, picture, psnr, run_both

from klein_agent.loading.lora import LoRAError
from klein_agent.pipeline import load_pipeline
from klein_agent.rules.requests import GenerationRequest

pytestmark = pytest.mark.slow  # whole pictures against diffusers per LoRA format

D, RANK = 32, 4  # Shape(): 2 heads of 16; mlp ratio 3 (linear_in 2 * 96)
FF = 96


def low_rank(
    out_features: int, in_features: int, g: torch.Generator, rank: int = RANK
) -> tuple[torch.Tensor, ...]:
    down = torch.randn(rank, in_features, generator=g) * in_features**-0.5
    up = torch.randn(out_features, rank, generator=g) * 0.6 * rank**-0.5
    return down, up


def diffusers_file(path: Path, seed: int, alpha: float | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    layers = {
        "transformer_blocks.0.attn.to_q": (D, D),
        "transformer_blocks.0.attn.to_v": (D, D),  # k left out: a partial q/k/v
        "transformer_blocks.1.attn.add_k_proj": (D, D),
        "transformer_blocks.0.attn.to_out.0": (D, D),
        "transformer_blocks.1.ff.linear_in": (2 * FF, D),
        "single_transformer_blocks.2.attn.to_qkv_mlp_proj": (3 * D + 2 * FF, D),
        "single_transformer_blocks.0.attn.to_out": (D, D + FF),
        "norm_out.linear": (2 * D, D),
        "context_embedder": (D, 96),
    }
    tensors = {}
    for name, (out_f, in_f) in layers.items():
        down, up = low_rank(out_f, in_f, g)
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
    metadata = None
    if alpha is not None:
        # as diffusers' save_lora_weights packs it: LoraConfig entries prefixed with the component
        config = {
            "transformer.r": RANK,
            "transformer.lora_alpha": alpha,
            "transformer.target_modules": sorted(layers),
        }
        metadata = {"lora_adapter_metadata": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_file(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    layers = {
        "double_blocks_0_img_attn_qkv": (3 * D, D, 2.0),
        "double_blocks_1_txt_attn_qkv": (3 * D, D, None),
        "double_blocks_0_txt_attn_proj": (D, D, 8.0),
        "double_blocks_1_img_mlp_2": (D, FF, 4.0),
        "single_blocks_1_linear1": (3 * D + 2 * FF, D, 3.0),
        "single_blocks_2_linear2": (D, D + FF, 4.0),
        "final_layer_linear": (4 * 4, D, 4.0),
    }
    tensors = {}
    for name, (out_f, in_f, alpha) in layers.items():
        down, up = low_rank(out_f, in_f, g)
        tensors[f"lora_unet_{name}.lora_down.weight"] = down
        tensors[f"lora_unet_{name}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def ai_toolkit_file(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    layers = {
        "double_blocks.0.img_attn.qkv": (3 * D, D),
        "double_blocks.1.txt_attn.qkv": (3 * D, D),
        "double_blocks.1.img_attn.proj": (D, D),
        "double_blocks.0.txt_mlp.0": (2 * FF, D),
        "single_blocks.0.linear1": (3 * D + 2 * FF, D),
        "single_blocks.1.linear2": (D, D + FF),
        "img_in": (D, 16),
    }
    tensors = {}
    for name, (out_f, in_f) in layers.items():
        down, up = low_rank(out_f, in_f, g)
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


WRITERS = {"diffusers": diffusers_file, "kohya": kohya_file, "ai-toolkit": ai_toolkit_file}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reference_checkpoint(tmp_path_factory.mktemp("lora-ref") / "ckpt", Shape(), seed=0)


def reference_with(folder: Path, files: list[Path], scales: list[float]) -> Flux2KleinPipeline:
    theirs = load_reference(folder)
    names = [f"a{k}" for k in range(len(files))]
    for path, name in zip(files, names, strict=True):
        theirs.load_lora_weights(str(path), adapter_name=name)
    theirs.set_adapters(names, scales)
    return theirs


REQUESTS = [
    GenerationRequest("a red cube on a blue floor", 80, 48, seed=7, steps=4),
    GenerationRequest("make it night", seed=3, steps=3, references=(picture(96, 64, 1),)),
]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_matches_diffusers(fmt: str, folder: Path, tmp_path: Path) -> None:
    path = WRITERS[fmt](tmp_path / f"{fmt}.safetensors", seed=1)
    ours = load_pipeline(str(folder), loras=[(str(path), 0.8)])
    assert ours.adapters[path.stem].format == fmt
    theirs = reference_with(folder, [path], [0.8])
    plain = load_pipeline(str(folder))
    for request in REQUESTS:
        got, want = run_both(ours, theirs, replace(request, loras=ours.info.loras))
        assert_same_pictures(got, want)
        assert psnr(plain.generate(request).images[0], want[0]) < MIN_PSNR_DB - 10  # the adapter matters


def test_diffusers_alpha_from_metadata_and_two_adapters_at_once(folder: Path, tmp_path: Path) -> None:
    first = diffusers_file(tmp_path / "style.safetensors", seed=2, alpha=8.0)
    second = kohya_file(tmp_path / "subject.safetensors", seed=3)
    ours = load_pipeline(str(folder), loras=[(str(first), 0.6), (str(second), -0.5)])
    theirs = reference_with(folder, [first, second], [0.6, -0.5])
    assert ours.info.loras == (("style", 0.6), ("subject", -0.5))
    assert_same_pictures(*run_both(ours, theirs, replace(REQUESTS[0], loras=ours.info.loras)))


def test_per_call_choice_equals_a_pipeline_loaded_with_only_that_adapter(
    folder: Path, tmp_path: Path
) -> None:
    """Adapters switch per call without touching the base weights: none, one, the other, back."""
    a = ai_toolkit_file(tmp_path / "a.safetensors", seed=4)
    b = kohya_file(tmp_path / "b.safetensors", seed=5)
    both = load_pipeline(str(folder), loras=[(str(a), 1.0), (str(b), 1.0)])
    only_b = load_pipeline(str(folder), loras=[(str(b), 0.7)])
    plain = load_pipeline(str(folder))
    base = GenerationRequest("a cube", 48, 48, seed=1, steps=2)
    for _ in range(2):
        got = both.generate(replace(base, loras=(("b", 0.7),))).images[0]
        assert got.tobytes() == only_b.generate(replace(base, loras=only_b.info.loras)).images[0].tobytes()
        none = both.generate(base).images[0]  # no choice runs none
        assert none.tobytes() == plain.generate(base).images[0].tobytes()


def test_a_lora_for_another_model_is_refused_naming_the_key(folder: Path, tmp_path: Path) -> None:
    ours = load_pipeline(str(folder))
    g = torch.Generator().manual_seed(0)
    wrong_block = tmp_path / "deeper.safetensors"
    down, up = low_rank(3 * D, D, g)
    save_file(
        {
            "diffusion_model.double_blocks.7.img_attn.qkv.lora_A.weight": down,
            "diffusion_model.double_blocks.7.img_attn.qkv.lora_B.weight": up,
        },
        str(wrong_block),
    )
    with pytest.raises(
        LoRAError,
        match=r"deeper\.safetensors, key 'diffusion_model\.double_blocks\.7\.img_attn\.qkv\.lora_A\.weight': it names no layer",
    ):
        ours.load_lora(wrong_block, "deeper")
    wider = tmp_path / "wider.safetensors"
    down, up = low_rank(D, 3072, g)
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": up,
        },
        str(wider),
    )
    with pytest.raises(
        LoRAError,
        match=r"wider\.safetensors, key 'lora_unet_double_blocks_0_img_attn_proj\.lora_down\.weight': down \[4, 3072\].*another model or klein size",
    ):
        ours.load_lora(wider, "wider")
    not_lora = tmp_path / "weights.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3 * D, D)}, str(not_lora))
    with pytest.raises(LoRAError, match="no LoRA format we read"):
        ours.load_lora(not_lora, "w")
    assert ours.info.loras == ()


def _prefixed_diffusers_file(path: Path, prefix: str, seed: int) -> Path:
    """diffusers' own layer names under a PEFT/ComfyUI prefix (blocks only: diffusers' converter takes those)."""
    g = torch.Generator().manual_seed(seed)
    layers = {
        "transformer_blocks.0.attn.to_q": (D, D),
        "transformer_blocks.0.attn.to_k": (D, D),
        "transformer_blocks.1.attn.to_add_out": (D, D),
        "transformer_blocks.0.ff_context.linear_out": (D, FF),
        "single_transformer_blocks.1.attn.to_qkv_mlp_proj": (3 * D + 2 * FF, D),
    }
    tensors = {}
    for name, (out_f, in_f) in layers.items():
        down, up = low_rank(out_f, in_f, g)
        tensors[f"{prefix}{name}.lora_A.weight"] = down
        tensors[f"{prefix}{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("prefix", ["diffusion_model.", "base_model.model."])
def test_diffusers_names_under_a_prefix_match_diffusers(prefix: str, folder: Path, tmp_path: Path) -> None:
    path = _prefixed_diffusers_file(tmp_path / "peft.safetensors", prefix, seed=6)
    ours = load_pipeline(str(folder), loras=[(str(path), 3.0)])
    assert ours.adapters["peft"].format == "diffusers names under a prefix"
    theirs = reference_with(folder, [path], [3.0])
    plain = load_pipeline(str(folder))
    got, want = run_both(ours, theirs, replace(REQUESTS[0], loras=ours.info.loras))
    assert_same_pictures(got, want)
    assert psnr(plain.generate(REQUESTS[0]).images[0], want[0]) < MIN_PSNR_DB - 10  # the adapter matters


def test_lora_down_up_under_diffusion_model_applied_where_diffusers_drops_them(
    folder: Path, tmp_path: Path
) -> None:
    """A documented difference: diffusers 0.42 reads `.lora_down.weight` keys as kohya's, converts none of these
    (they lack `lora_unet_`) and applies nothing (a logged warning); we apply them as ai-toolkit's lora_A/lora_B."""
    named_ab = ai_toolkit_file(tmp_path / "ab.safetensors", seed=7)
    from safetensors.torch import load_file

    renamed = {
        k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
        for k, v in load_file(str(named_ab)).items()
    }
    down_up = tmp_path / "downup.safetensors"
    save_file(renamed, str(down_up))
    request = GenerationRequest("a cube", 48, 48, seed=2, steps=2)
    ours = load_pipeline(str(folder), loras=[(str(down_up), 1.0)])
    same = load_pipeline(str(folder), loras=[(str(named_ab), 1.0)])
    got = ours.generate(replace(request, loras=ours.info.loras)).images[0]
    assert got.tobytes() == same.generate(replace(request, loras=same.info.loras)).images[0].tobytes()
    theirs = load_reference(folder)
    theirs.load_lora_weights(str(down_up), adapter_name="a0")  # no error: a warning, and nothing loaded
    plain_theirs = load_reference(folder)
    _, dropped = run_both(ours, theirs, replace(request, loras=ours.info.loras))
    _, plain = run_both(ours, plain_theirs, request)
    assert dropped[0].tobytes() == plain[0].tobytes()  # diffusers ran without it
