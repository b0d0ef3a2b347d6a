"""Key maps between the diffusers layout and ours (BFL's names), for the transformer and the autoencoder.

Both directions are implemented so any checkpoint can be converted and tested by a round trip. Beyond renames there
are three reshapes: diffusers splits fused q/k/v projections, stores the final layer's modulation as [scale; shift]
where BFL stores [shift; scale], and stores the autoencoder's attention projections as linear [C, C] weights where
BFL has 1x1 convolutions [C, C, 1, 1].
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

# ----------------------------------------------------------------------------------------------------- transformer

# (diffusers pattern, ours) for one-to-one renames; {n} is a block index
_TRANSFORMER_RENAMES: list[tuple[str, str]] = [
    ("x_embedder.weight", "img_in.weight"),
    ("context_embedder.weight", "txt_in.weight"),
    ("time_guidance_embed.timestep_embedder.linear_1.weight", "time_in.in_layer.weight"),
    ("time_guidance_embed.timestep_embedder.linear_2.weight", "time_in.out_layer.weight"),
    ("double_stream_modulation_img.linear.weight", "double_stream_modulation_img.lin.weight"),
    ("double_stream_modulation_txt.linear.weight", "double_stream_modulation_txt.lin.weight"),
    ("single_stream_modulation.linear.weight", "single_stream_modulation.lin.weight"),
    ("proj_out.weight", "final_layer.linear.weight"),
    ("transformer_blocks.{n}.attn.norm_q.weight", "double_blocks.{n}.img_attn.norm.query_norm.scale"),
    ("transformer_blocks.{n}.attn.norm_k.weight", "double_blocks.{n}.img_attn.norm.key_norm.scale"),
    ("transformer_blocks.{n}.attn.norm_added_q.weight", "double_blocks.{n}.txt_attn.norm.query_norm.scale"),
    ("transformer_blocks.{n}.attn.norm_added_k.weight", "double_blocks.{n}.txt_attn.norm.key_norm.scale"),
    ("transformer_blocks.{n}.attn.to_out.0.weight", "double_blocks.{n}.img_attn.proj.weight"),
    ("transformer_blocks.{n}.attn.to_add_out.weight", "double_blocks.{n}.txt_attn.proj.weight"),
    ("transformer_blocks.{n}.ff.linear_in.weight", "double_blocks.{n}.img_mlp.0.weight"),
    ("transformer_blocks.{n}.ff.linear_out.weight", "double_blocks.{n}.img_mlp.2.weight"),
    ("transformer_blocks.{n}.ff_context.linear_in.weight", "double_blocks.{n}.txt_mlp.0.weight"),
    ("transformer_blocks.{n}.ff_context.linear_out.weight", "double_blocks.{n}.txt_mlp.2.weight"),
    ("single_transformer_blocks.{n}.attn.to_qkv_mlp_proj.weight", "single_blocks.{n}.linear1.weight"),
    ("single_transformer_blocks.{n}.attn.to_out.weight", "single_blocks.{n}.linear2.weight"),
    ("single_transformer_blocks.{n}.attn.norm_q.weight", "single_blocks.{n}.norm.query_norm.scale"),
    ("single_transformer_blocks.{n}.attn.norm_k.weight", "single_blocks.{n}.norm.key_norm.scale"),
]
# fused q/k/v: (diffusers q, k, v patterns, ours)
_TRANSFORMER_QKV: list[tuple[tuple[str, str, str], str]] = [
    (
        (
            "transformer_blocks.{n}.attn.to_q.weight",
            "transformer_blocks.{n}.attn.to_k.weight",
            "transformer_blocks.{n}.attn.to_v.weight",
        ),
        "double_blocks.{n}.img_attn.qkv.weight",
    ),
    (
        (
            "transformer_blocks.{n}.attn.add_q_proj.weight",
            "transformer_blocks.{n}.attn.add_k_proj.weight",
            "transformer_blocks.{n}.attn.add_v_proj.weight",
        ),
        "double_blocks.{n}.txt_attn.qkv.weight",
    ),
]
_FINAL_MOD_DIFFUSERS = "norm_out.linear.weight"
_FINAL_MOD_OURS = "final_layer.adaLN_modulation.1.weight"


def _swap_halves(w: Tensor) -> Tensor:
    first, second = w.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def transformer_from_diffusers(sd: Mapping[str, Tensor]) -> StateDict:
    """diffusers `Flux2Transformer2DModel` keys -> ours. Keys it does not know pass through unchanged, so strict
    loading names them."""
    src = dict(sd)
    out: StateDict = {}
    for (q_pat, k_pat, v_pat), ours in _TRANSFORMER_QKV:
        for key in [k for k in src if _match(q_pat, k) is not None]:
            n = _match(q_pat, key)
            k_key, v_key = k_pat.format(n=n), v_pat.format(n=n)
            if k_key in src and v_key in src:
                out[ours.format(n=n)] = torch.cat((src.pop(key), src.pop(k_key), src.pop(v_key)), dim=0)
    if _FINAL_MOD_DIFFUSERS in src:
        out[_FINAL_MOD_OURS] = _swap_halves(src.pop(_FINAL_MOD_DIFFUSERS))
    out.update(_rename_all(src, _TRANSFORMER_RENAMES, forward=True))
    return out


def transformer_to_diffusers(sd: Mapping[str, Tensor]) -> StateDict:
    """ours (BFL single-file names) -> diffusers."""
    src = dict(sd)
    out: StateDict = {}
    for (q_pat, k_pat, v_pat), ours in _TRANSFORMER_QKV:
        for key in [k for k in src if _match(ours, k) is not None]:
            n = _match(ours, key)
            q, k, v = src.pop(key).chunk(3, dim=0)
            out[q_pat.format(n=n)], out[k_pat.format(n=n)], out[v_pat.format(n=n)] = q, k, v
    if _FINAL_MOD_OURS in src:
        out[_FINAL_MOD_DIFFUSERS] = _swap_halves(src.pop(_FINAL_MOD_OURS))
    out.update(_rename_all(src, _TRANSFORMER_RENAMES, forward=False))
    return out


def strip_prefix(sd: Mapping[str, Tensor], prefix: str = "model.diffusion_model.") -> StateDict:
    """ComfyUI-saved single files prefix every key; accept both spellings."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


# ----------------------------------------------------------------------------------------------------- autoencoder

_RESNET_PARTS = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
_ATTN_PARTS = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
_ATTN_PROJECTIONS = {"q", "k", "v", "proj_out"}  # linear in diffusers, 1x1 conv in ours


def _vae_renames(num_levels: int) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = [
        ("quant_conv.{p}", "encoder.quant_conv.{p}"),
        ("post_quant_conv.{p}", "decoder.post_quant_conv.{p}"),
        ("bn.{p}", "bn.{p}"),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in.{{p}}", f"{part}.conv_in.{{p}}"),
            (f"{part}.conv_out.{{p}}", f"{part}.conv_out.{{p}}"),
            (f"{part}.conv_norm_out.{{p}}", f"{part}.norm_out.{{p}}"),
            (f"{part}.mid_block.resnets.0.{{p}}", f"{part}.mid.block_1.{{p}}"),
            (f"{part}.mid_block.resnets.1.{{p}}", f"{part}.mid.block_2.{{p}}"),
        ]
        pairs += [
            (f"{part}.mid_block.attentions.0.{d}.{{p}}", f"{part}.mid.attn_1.{o}.{{p}}")
            for d, o in _ATTN_PARTS
        ]
    for i in range(num_levels):
        j = (
            num_levels - 1 - i
        )  # diffusers numbers decoder levels from the lowest resolution, BFL from the highest
        pairs += [
            (
                f"encoder.down_blocks.{i}.resnets.{{n}}.conv_shortcut.{{p}}",
                f"encoder.down.{i}.block.{{n}}.nin_shortcut.{{p}}",
            ),
            (f"encoder.down_blocks.{i}.downsamplers.0.conv.{{p}}", f"encoder.down.{i}.downsample.conv.{{p}}"),
            (
                f"decoder.up_blocks.{i}.resnets.{{n}}.conv_shortcut.{{p}}",
                f"decoder.up.{j}.block.{{n}}.nin_shortcut.{{p}}",
            ),
            (f"decoder.up_blocks.{i}.upsamplers.0.conv.{{p}}", f"decoder.up.{j}.upsample.conv.{{p}}"),
        ]
        for d, o in _RESNET_PARTS:
            pairs += [
                (
                    f"encoder.down_blocks.{i}.resnets.{{n}}.{d}.{{p}}",
                    f"encoder.down.{i}.block.{{n}}.{o}.{{p}}",
                ),
                (f"decoder.up_blocks.{i}.resnets.{{n}}.{d}.{{p}}", f"decoder.up.{j}.block.{{n}}.{o}.{{p}}"),
            ]
    return pairs


def _vae_levels(keys: list[str], pattern: str) -> int:
    levels = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(levels) + 1 if levels else 0


def autoencoder_from_diffusers(sd: Mapping[str, Tensor]) -> StateDict:
    """diffusers `AutoencoderKLFlux2` keys -> ours."""
    levels = _vae_levels(list(sd), r"encoder\.down_blocks\.(\d+)\.")
    out = _rename_all(dict(sd), _vae_renames(levels), forward=True)
    return {k: _as_conv(v) if _is_attn_projection(k) else v for k, v in out.items()}


def autoencoder_to_diffusers(sd: Mapping[str, Tensor]) -> StateDict:
    """ours -> diffusers."""
    levels = _vae_levels(list(sd), r"encoder\.down\.(\d+)\.")
    src = {k: v.flatten(1) if _is_attn_projection(k) and k.endswith(".weight") else v for k, v in sd.items()}
    return _rename_all(src, _vae_renames(levels), forward=False)


def _is_attn_projection(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 4 and parts[-3] == "attn_1" and parts[-2] in _ATTN_PROJECTIONS


def _as_conv(w: Tensor) -> Tensor:
    return w[:, :, None, None] if w.ndim == 2 else w


# ----------------------------------------------------------------------------------------------------- machinery


def _compile(pattern: str) -> re.Pattern[str]:
    regex = re.escape(pattern).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>[A-Za-z0-9_.]+)")
    return re.compile(f"^{regex}$")


_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def _match(pattern: str, key: str) -> str | None:
    """The block index {n} if `key` matches `pattern` (which has exactly {n}), else None."""
    regex = _PATTERN_CACHE.setdefault(pattern, _compile(pattern))
    m = regex.match(key)
    return m.group("n") if m else None


def _formatter(target: str) -> Callable[[re.Match[str]], str]:
    def make(m: re.Match[str]) -> str:
        return target.format(**m.groupdict())

    return make


def _rename_all(src: dict[str, Tensor], pairs: list[tuple[str, str]], *, forward: bool) -> StateDict:
    compiled: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = []
    for a, b in pairs:
        source, target = (a, b) if forward else (b, a)
        regex = _PATTERN_CACHE.setdefault(source, _compile(source))
        compiled.append((regex, _formatter(target)))
    out: StateDict = {}
    for key, value in src.items():
        for regex, make in compiled:
            m = regex.match(key)
            if m:
                out[make(m)] = value
                break
        else:
            out[key] = value  # unknown: let strict loading name it
    return out


def transformer_layer_from_diffusers(module: str) -> tuple[str, int | None, bool] | None:
    """A diffusers `Flux2Transformer2DModel` linear layer name (no `.weight`) -> (our layer name, which third of
    a fused q/k/v it fills or None, whether its output halves are swapped), or None for a name we do not know.
    LoRA files in the diffusers layout name layers this way."""
    key = f"{module}.weight"
    for patterns, ours in _TRANSFORMER_QKV:
        for part, pattern in enumerate(patterns):
            found = _groups(pattern, key)
            if found is not None:
                return ours.format(**found).removesuffix(".weight"), part, False
    if key == _FINAL_MOD_DIFFUSERS:
        return _FINAL_MOD_OURS.removesuffix(".weight"), None, True
    for theirs, ours in _TRANSFORMER_RENAMES:
        found = _groups(theirs, key)
        if found is not None and ours.endswith(".weight"):
            return ours.format(**found).removesuffix(".weight"), None, False
    return None


def _groups(pattern: str, key: str) -> dict[str, str] | None:
    regex = _PATTERN_CACHE.setdefault(pattern, _compile(pattern))
    m = regex.match(key)
    return m.groupdict() if m else None
