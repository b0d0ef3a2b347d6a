"""BFL-quantized transformer files written by diffusers' own quantize functions (`quantize_fp8r`, `quantize_nvfp4`
in diffusers/quantizers/bfl/utils.py), and the reference that loads them (`BFLQuantizationConfig`).

The linears of the double- and single-stream blocks are quantized, as in BFL's published klein FP8 files; the
embedders, modulations and final layer stay in floating point. BFL single files quantize the fused q/k/v weights
(one nvfp4 global scale for all three); the diffusers layout quantizes q, k and v apart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import BFLQuantizationConfig, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.quantizers.bfl.utils import quantize_fp8r, quantize_nvfp4
from safetensors.torch import load_file, save_file
from torch import Tensor

from klein_agent.loading import keymaps

KINDS = ("fp8r", "nvfp4")
PREFIX = "model.diffusion_model."


def _is_block_linear(key: str, tensor: Tensor) -> bool:
    blocks = ("double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks.")
    return key.startswith(blocks) and key.endswith(".weight") and tensor.ndim == 2


def quantize_state(state: dict[str, Tensor], kind: str, *, every_linear: bool = False) -> dict[str, Tensor]:
    """`state` with every block linear (with `every_linear`, every 2-D weight) quantized by diffusers' function for
    `kind`, scales beside each weight."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        chosen = (
            tensor.ndim == 2 and key.endswith(".weight") if every_linear else _is_block_linear(key, tensor)
        )
        if not chosen:
            out[key] = tensor
            continue
        prefix = key.removesuffix(".weight")
        if kind == "fp8r":
            out[key], out[f"{prefix}.weight_scale"] = quantize_fp8r(tensor)
        else:
            weight, scale, scale_2 = quantize_nvfp4(tensor)
            out[key], out[f"{prefix}.weight_scale"], out[f"{prefix}.weight_scale_2"] = weight, scale, scale_2
            # a calibrated activation scale, as ModelOpt writes one; only a Blackwell FP4 kernel reads it
            out[f"{prefix}.input_scale"] = tensor.abs().amax().float() / 448.0
    return out


def diffusers_transformer_state(folder: Path) -> dict[str, Tensor]:
    """The unquantized transformer of a diffusers-written checkpoint folder, in diffusers' names."""
    state: dict[str, Tensor] = {}
    for file in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def write_single_file(folder: Path, kind: str, target: Path, *, prefixed: bool = False) -> Path:
    """The transformer of `folder` as a BFL single file (BFL's names), quantized as `kind`."""
    bfl = keymaps.transformer_from_diffusers(diffusers_transformer_state(folder))
    state = quantize_state(bfl, kind)
    if prefixed:
        state = {PREFIX + k: v for k, v in state.items()}
    save_file(state, str(target))
    return target


def write_quantized_folder(folder: Path, kind: str, target: Path) -> Path:
    """A copy of the diffusers folder whose transformer weights are quantized as `kind` (diffusers' names)."""
    shutil.copytree(folder, target)
    transformer = target / "transformer"
    for file in transformer.glob("*.safetensors*"):
        file.unlink()
    save_file(
        quantize_state(diffusers_transformer_state(folder), kind), str(transformer / "quantized.safetensors")
    )
    return target


def load_quantized_reference(
    folder: Path, weights: Path | dict[str, Tensor], compute_dtype: torch.dtype | None = None
) -> Flux2KleinPipeline:
    """diffusers' pipeline for `folder` with its transformer read by `from_single_file` and `BFLQuantizationConfig`
    (its one loader for these files; `weights` is a BFL single file or a state in diffusers' names). With
    `compute_dtype` None the config's default (bfloat16) is used and the whole pipeline loads in bfloat16."""
    config = (
        BFLQuantizationConfig()
        if compute_dtype is None
        else BFLQuantizationConfig(compute_dtype=compute_dtype)
    )
    source = str(weights) if isinstance(weights, Path) else weights
    transformer = Flux2Transformer2DModel.from_single_file(
        source, config=str(folder), subfolder="transformer", quantization_config=config
    )
    dtype = config.compute_dtype
    pipe = Flux2KleinPipeline.from_pretrained(str(folder), transformer=transformer, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
