"""Key maps between diffusers' `Flux3Transformer2DModel` layout and ours (BFL's single-file names).

The renames are those of diffusers' converter `convert_flux3_transformer_checkpoint_to_diffusers` (diffusers
0.42.1, `loaders/single_file_utils.py`), run both ways. Beyond renames there is one reshape: the output layer's
modulation is [shift; scale] in BFL's files and [scale; shift] in diffusers'. BFL's training-only REPA heads
(`repa_projectors.*`) are not part of the inference model and are dropped, as diffusers drops them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

# exact keys: (diffusers, ours)
_EXACT: list[tuple[str, str]] = [
    ("context_embedder.weight", "txt_in.weight"),
    ("timestep_embedder.linear_1.weight", "time_in.in_layer.weight"),
    ("timestep_embedder.linear_2.weight", "time_in.out_layer.weight"),
    ("target_timestep_embedder.linear_1.weight", "ref_time_in.in_layer.weight"),
    ("target_timestep_embedder.linear_2.weight", "ref_time_in.out_layer.weight"),
    ("proj_out.weight", "final_layer.image.linear.weight"),
]
_FINAL_MOD = ("norm_out.linear.weight", "final_layer.image.adaLN_modulation.1.weight")
# module prefixes: (diffusers, ours)
_PREFIXES: list[tuple[str, str]] = [
    ("x_embedders.", "emb_in."),
    ("mode_blocks.", "content_mode_blocks."),
    ("single_transformer_blocks.", "single_blocks."),
]
# inside a block: (diffusers, ours)
_BLOCK_SUFFIXES: list[tuple[str, str]] = [
    ("attn.to_q.weight", "q_proj.weight"),
    ("attn.to_k.weight", "k_proj.weight"),
    ("attn.to_v.weight", "v_proj.weight"),
    ("attn.to_out.0.weight", "attn_out.weight"),
    ("attn.norm_q.weight", "norm.query_norm.scale"),
    ("attn.norm_k.weight", "norm.key_norm.scale"),
    ("ff.linear_in.weight", "mlp_in.weight"),
    ("ff.linear_out.weight", "mlp_out.weight"),
]
_MODULATION = (".linear.weight", ".lin.weight")  # {early,single}_stream_modulations.<mode>
TRAINING_ONLY_PREFIX = "repa_projectors."


def _swap_halves(w: Tensor) -> Tensor:
    first, second = w.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def _rename(key: str, forward: bool) -> str:
    src, dst = (0, 1) if forward else (1, 0)
    for pair in _EXACT:
        if key == pair[src]:
            return pair[dst]
    for pair in _PREFIXES:
        if key.startswith(pair[src]):
            key = pair[dst] + key[len(pair[src]) :]
            break
    if "stream_modulations." in key and key.endswith(_MODULATION[src]):
        return key[: -len(_MODULATION[src])] + _MODULATION[dst]
    for pair in _BLOCK_SUFFIXES:
        if key.endswith("." + pair[src]):
            return key[: -len(pair[src])] + pair[dst]
    return key


def transformer_from_diffusers(sd: Mapping[str, Tensor]) -> StateDict:
    """diffusers `Flux3Transformer2DModel` keys -> ours. Keys it does not know pass through renamed as far as they
    match, so strict loading names them."""
    out: StateDict = {}
    for key, value in sd.items():
        if key == _FINAL_MOD[0]:
            out[_FINAL_MOD[1]] = _swap_halves(value)
        else:
            out[_rename(key, forward=True)] = value
    return out


def transformer_to_diffusers(sd: Mapping[str, Tensor]) -> StateDict:
    """ours (BFL single-file names) -> diffusers."""
    out: StateDict = {}
    for key, value in sd.items():
        if key == _FINAL_MOD[1]:
            out[_FINAL_MOD[0]] = _swap_halves(value)
        else:
            out[_rename(key, forward=False)] = value
    return out


def drop_training_only(sd: Mapping[str, Tensor]) -> StateDict:
    """A BFL file without its REPA projection heads (used only in training; diffusers drops them too)."""
    return {k: v for k, v in sd.items() if not k.startswith(TRAINING_ONLY_PREFIX)}


def lora_layers_from_diffusers(ours: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """diffusers layer name (no `.weight`) -> (our layer name, whether its output halves are swapped), for each of
    `ours` (our linear layers, BFL names): the names a FLUX 3 LoRA in diffusers' layout may use. Built from the model's
    own layers, so a name diffusers' `Flux3Transformer2DModel` has no layer for maps to nothing. q, k and v are
    separate layers on both sides (unlike FLUX.2's fused ones); only the output layer's modulation is swapped."""
    table: dict[str, tuple[str, bool]] = {}
    for name in ours:
        weight = f"{name}.weight"
        theirs = _FINAL_MOD[0] if weight == _FINAL_MOD[1] else _rename(weight, forward=False)
        table[theirs.removesuffix(".weight")] = (name, weight == _FINAL_MOD[1])
    return table
