"""LoRA files to low-rank updates of our transformer's layers, in the formats people publish for FLUX.2 [klein].

Formats, told apart by their keys (diffusers `Flux2LoraLoaderMixin.lora_state_dict` tells them apart the same way):
- diffusers / PEFT: `transformer.<diffusers layer>.lora_A.weight` / `.lora_B.weight`; q, k and v are separate
  layers (we stack them into our fused q/k/v); alpha from the file's `lora_adapter_metadata`, else alpha = rank;
- kohya: `lora_unet_<BFL layer, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- ai-toolkit: `diffusion_model.<BFL layer>.lora_A.weight` / `.lora_B.weight` (or lora_down / lora_up), fused q/k/v
  as BFL has it; PEFT's `base_model.model.` prefix means the same.
Each becomes one `LowRank` per layer, alpha / rank folded in. A key that names no layer of the model, or whose
shape does not fit it, is refused, naming that key: the file is for another model or size.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from klein_agent.loading.keymaps import transformer_layer_from_diffusers
from klein_agent.model.lora import LoRALinear, LowRank


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to this model; the message names the file and the first bad key."""


@dataclass(frozen=True)
class AdapterFile:
    """A LoRA file read for one model: its format and one update per layer it touches."""

    path: Path
    format: str  # "diffusers", "kohya" or "ai-toolkit"
    updates: dict[str, LowRank]  # our layer name (no `.weight`) -> update

    @property
    def rank(self) -> int:
        """The largest rank over its layers."""
        return max(u.down.shape[0] for u in self.updates.values())


@dataclass
class _Part:
    rows: int | None  # which third of a fused q/k/v, or None for the whole layer
    down: Tensor
    up: Tensor
    key: str  # the file's key of `down`, for messages


def read_lora(path: str | Path, model: nn.Module) -> AdapterFile:
    """Read the safetensors LoRA at `path` for `model` (our transformer). Raises LoRAError for a file that is not
    a LoRA, an unknown format, or a key that names no layer of `model` or does not fit its shape."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            metadata = f.metadata() or {}
    except (OSError, ValueError, RuntimeError) as exc:  # a missing file, or not safetensors
        raise LoRAError(f"LoRA {path}: cannot read it as a safetensors file ({exc})") from exc
    layers = {
        name: (m.base if isinstance(m, LoRALinear) else m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | LoRALinear)
    }
    fmt, parts = _parts(path, tensors, metadata, layers)
    return AdapterFile(path, fmt, _combine(path, parts, layers))


def _parts(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], layers: dict[str, nn.Linear]
) -> tuple[str, dict[str, list[_Part]]]:
    keys = list(tensors)
    if not keys:
        raise LoRAError(f"LoRA {path}: the file holds no tensors")
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya", _kohya(path, tensors, layers)
    if all(k.startswith(("diffusion_model.", "base_model.model.")) for k in keys):
        return "ai-toolkit", _ai_toolkit(path, tensors)
    if all(k.startswith("transformer.") for k in keys):
        return "diffusers", _diffusers(path, tensors, metadata)
    raise LoRAError(
        f"LoRA {path}: key {keys[0]!r} is in no format we read (diffusers 'transformer.…lora_A.weight', kohya "
        "'lora_unet_…lora_down.weight', ai-toolkit 'diffusion_model.…lora_A.weight'): is this a FLUX.2 [klein] LoRA?"
    )


def _split(path: Path, key: str, prefix: str) -> tuple[str, str]:
    """'<prefix><layer>.<kind>.weight' -> (layer, kind) for kind lora_A/lora_B/lora_down/lora_up, or '.alpha'."""
    body = key[len(prefix) :]
    if body.endswith(".alpha"):
        return body[: -len(".alpha")], "alpha"
    for kind in ("lora_A", "lora_B", "lora_down", "lora_up"):
        if body.endswith(f".{kind}.weight"):
            return body[: -len(f".{kind}.weight")], kind
    raise LoRAError(
        f"LoRA {path}: key {key!r} is not a LoRA weight (lora_A/lora_B/lora_down/lora_up or alpha)"
    )


def _pairs(path: Path, tensors: dict[str, Tensor], prefix: str) -> dict[str, dict[str, tuple[str, Tensor]]]:
    found: dict[str, dict[str, tuple[str, Tensor]]] = defaultdict(dict)
    for key, value in tensors.items():
        layer, kind = _split(path, key, prefix)
        kind = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(kind, kind)
        found[layer][kind] = (key, value)
    for layer, kinds in found.items():
        for needed in ("lora_A", "lora_B"):
            if needed not in kinds:
                raise LoRAError(f"LoRA {path}: layer {layer!r} has no {needed} (down/up) weight")
    return found


def _kohya(path: Path, tensors: dict[str, Tensor], layers: dict[str, nn.Linear]) -> dict[str, list[_Part]]:
    by_flat = {name.replace(".", "_"): name for name in layers}
    parts: dict[str, list[_Part]] = defaultdict(list)
    for flat, kinds in _pairs(path, tensors, "lora_unet_").items():
        key, down = kinds["lora_A"]
        if flat not in by_flat:
            raise LoRAError(f"LoRA {path}: key {key!r} names no layer of this model: it is for another model")
        up = kinds["lora_B"][1]
        rank = down.shape[0]
        alpha = float(kinds["alpha"][1]) if "alpha" in kinds else float(rank)
        parts[by_flat[flat]].append(_Part(None, down, up * (alpha / rank), key))
    return parts


def _ai_toolkit(path: Path, tensors: dict[str, Tensor]) -> dict[str, list[_Part]]:
    renamed = {
        ("diffusion_model." + k.removeprefix("base_model.model.").removeprefix("diffusion_model.")): v
        for k, v in tensors.items()
    }
    parts: dict[str, list[_Part]] = defaultdict(list)
    for layer, kinds in _pairs(path, renamed, "diffusion_model.").items():
        if "alpha" in kinds:  # diffusers' ai-toolkit reader takes none either
            raise LoRAError(f"LoRA {path}: key {kinds['alpha'][0]!r}: ai-toolkit files carry no alpha")
        key, down = kinds["lora_A"]
        parts[layer].append(_Part(None, down, kinds["lora_B"][1], key))
    return parts


def _diffusers(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, list[_Part]]:
    alpha = None
    if "lora_adapter_metadata" in metadata:
        packed = json.loads(
            metadata["lora_adapter_metadata"]
        )  # diffusers prefixes each entry with "transformer."
        config = {
            k.removeprefix("transformer."): v for k, v in packed.items() if k.startswith("transformer.")
        }
        if config.get("alpha_pattern") or config.get("rank_pattern"):
            raise LoRAError(f"LoRA {path}: per-layer alpha or rank patterns are not supported")
        alpha = config.get("lora_alpha")
    parts: dict[str, list[_Part]] = defaultdict(list)
    for layer, kinds in _pairs(path, tensors, "transformer.").items():
        key, down = kinds["lora_A"]
        if "alpha" in kinds:
            raise LoRAError(
                f"LoRA {path}: key {kinds['alpha'][0]!r}: diffusers files carry alpha in their metadata"
            )
        target = transformer_layer_from_diffusers(layer)
        if target is None:
            raise LoRAError(f"LoRA {path}: key {key!r} names no layer of this model: it is for another model")
        ours, third, swap = target
        up = kinds["lora_B"][1]
        if swap:  # diffusers stores the final modulation as [scale; shift], BFL as [shift; scale]
            first, second = up.chunk(2, dim=0)
            up = torch.cat((second, first), dim=0)
        rank = down.shape[0]
        scale = 1.0 if alpha is None else float(alpha) / rank
        parts[ours].append(_Part(third, down, up * scale, key))
    return parts


def _combine(path: Path, parts: dict[str, list[_Part]], layers: dict[str, nn.Linear]) -> dict[str, LowRank]:
    """One update per layer: parts of a fused q/k/v are stacked (down rows) into a block-diagonal up."""
    updates = {}
    for name, pieces in parts.items():
        layer = layers.get(name)
        if layer is None:
            raise LoRAError(
                f"LoRA {path}: key {pieces[0].key!r} names no layer of this model ({name}): it is for another model"
            )
        for piece in pieces:
            rows = layer.out_features if piece.rows is None else layer.out_features // 3
            if (
                piece.down.ndim != 2
                or piece.up.ndim != 2
                or piece.down.shape[1] != layer.in_features
                or piece.up.shape != (rows, piece.down.shape[0])
            ):
                raise LoRAError(
                    f"LoRA {path}: key {piece.key!r} has down {list(piece.down.shape)} and up "
                    f"{list(piece.up.shape)}, but layer {name} maps {layer.in_features} to {rows} features: the "
                    "LoRA is for another model or size"
                )
        if len(pieces) == 1 and pieces[0].rows is None:
            updates[name] = LowRank(pieces[0].down.float(), pieces[0].up.float())
            continue
        if any(p.rows is None for p in pieces) or len({p.rows for p in pieces}) != len(pieces):
            raise LoRAError(f"LoRA {path}: layer {name} is given twice (fused and split)")
        third = layer.out_features // 3
        rank = sum(p.down.shape[0] for p in pieces)
        up = torch.zeros(layer.out_features, rank)
        downs, start = [], 0
        for p in sorted(pieces, key=lambda p: p.rows or 0):
            r = p.down.shape[0]
            assert p.rows is not None
            up[p.rows * third : (p.rows + 1) * third, start : start + r] = p.up.float()
            downs.append(p.down.float())
            start += r
        updates[name] = LowRank(torch.cat(downs), up)
    return updates
