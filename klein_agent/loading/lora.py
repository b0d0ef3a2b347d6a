"""LoRA files to low-rank updates of our transformer's layers, in the formats people publish for FLUX.2 [klein]
and those diffusers reads for FLUX 3 [klein].

Formats, told apart by their keys (diffusers `Flux2LoraLoaderMixin.lora_state_dict` tells them apart the same way):
- diffusers / PEFT: `transformer.<diffusers layer>.lora_A.weight` / `.lora_B.weight`; q, k and v are separate
  layers (we stack them into our fused q/k/v); alpha from the file's `lora_adapter_metadata`, else alpha = rank;
- kohya: `lora_unet_<BFL layer, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- ai-toolkit: `diffusion_model.<BFL layer>.lora_A.weight` / `.lora_B.weight` (or lora_down / lora_up), fused q/k/v
  as BFL has it; PEFT's `base_model.model.` prefix means the same. Under either prefix a layer may also carry
  diffusers' own name (PEFT and ComfyUI exports do this; diffusers' converter accepts them too).
Each becomes one `LowRank` per layer, alpha / rank folded in.

FLUX 3 (`Flux3Transformer`, BFL names too) has separate q, k and v layers, so nothing is fused: diffusers' names map
one to one (`flux3_keymaps.lora_layers_from_diffusers`), and `diffusion_model.` files carry BFL's names (diffusers
`Flux3LoraLoaderMixin` converts those with `_convert_non_diffusers_flux3_lora_to_diffusers`, which renames only the
block internals: a BFL key outside the blocks, e.g. `txt_in`, reaches no layer there and diffusers drops it with a
warning; it names our layer exactly, so we apply it). diffusers reads no LoKr file for FLUX 3 (its loader wants
"lora" in every key), and neither do we.

A file is checked in two passes so a hostile one costs nothing: first its header alone (`SafetensorsFile`: sizes,
offsets, dtypes), every key mapped to a layer and every shape checked against that layer, rank at most
min(in, out); only then are the tensors read, one at a time, and their values checked (finite, alpha a positive
number, the update not absurdly large: see `_check_magnitude`). Every refusal is a LoRAError naming the file, the
key and the fix. A file of LoKr keys (`.lokr_`) is read by `klein_agent.loading.lokr` with the same discipline.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from klein_agent.loading import flux3_keymaps
from klein_agent.loading.adapter_values import (
    check_alpha_entry,
    check_row_norms,
    check_weight_dtype,
    finite,
    read_alpha,
)
from klein_agent.loading.errors import LoRAError
from klein_agent.loading.keymaps import transformer_layer_from_diffusers
from klein_agent.loading.lokr import is_lokr, read_lokr
from klein_agent.loading.safetensors_file import SafetensorsFile, parse_json
from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.model.lora import Kronecker, LoRALinear, LowRank, Update

__all__ = ["AdapterFile", "LoRAError", "read_lora"]

log = logging.getLogger(__name__)

ANOTHER_MODEL = "the LoRA is for another model or klein size: use one trained for this model"
# what a diffusers layer name becomes: (our layer, which third of a fused q/k/v or None, output halves swapped)
Target = tuple[str, int | None, bool]
PREFIXES = ("diffusion_model.", "base_model.model.")
_KINDS = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}
# metadata fields trainers use for the model an adapter was trained on (kohya sd-scripts, modelspec, PEFT/ai-toolkit)
BASE_MODEL_FIELDS = ("ss_base_model_version", "modelspec.architecture", "base_model")


@dataclass(frozen=True)
class AdapterFile:
    """A LoRA or LoKr file read for one model: its format and one update per layer it touches."""

    path: Path
    # "diffusers", "kohya", "ai-toolkit", "diffusers names under a prefix"; "BFL LoKr", "LyCORIS LoKr", "diffusers LoKr"
    format: str
    updates: dict[str, Update]  # our layer name (no `.weight`) -> update

    @property
    def rank(self) -> int:
        """The largest LoRA rank over its layers (0 for a LoKr file, whose updates have factors, not a rank)."""
        return max((u.down.shape[0] for u in self.updates.values() if isinstance(u, LowRank)), default=0)

    @property
    def summary(self) -> str:
        """What the log says of it: format, layers, and rank or largest Kronecker factors."""
        head = f"{self.format} format, {len(self.updates)} layers"
        pieces = [p for u in self.updates.values() if isinstance(u, Kronecker) for p in u.pieces]
        if not pieces:
            return f"{head}, rank {self.rank}"
        p = max(pieces, key=lambda p: sum(m.numel() for m in (*p.w1, *p.w2)))
        w1, w2 = ([m.shape[0], m_last.shape[1]] for m, m_last in ((p.w1[0], p.w1[-1]), (p.w2[0], p.w2[-1])))
        return f"{head}, largest Kronecker factors w1 {w1} ⊗ w2 {w2}"


@dataclass
class _Part:
    """One (down, up) pair of the file, by key, and where it goes."""

    layer: str  # our layer name
    rows: int | None  # which third of a fused q/k/v, or None for the whole layer
    swap: bool  # diffusers' final modulation is [scale; shift], BFL's [shift; scale]
    down: str
    up: str
    alpha: str | None  # kohya's per-layer alpha tensor


def read_lora(
    path: str | Path, model: nn.Module, variant: str | None = None, *, max_scale: float
) -> AdapterFile:
    """Read the safetensors LoRA or LoKr at `path` for `model` (our transformer; `variant`, e.g. "klein-4b", only
    for a warning when the file's metadata names another base model; `max_scale`, the largest |scale| a call may run
    it at, rules.loras.MAX_LORA_SCALE, bounds its values). Raises LoRAError, naming the file, the key and the
    fix, for anything that is not a sound adapter for this model; no tensor is read before every shape fits."""
    path = Path(path)
    layers = {
        name: (m.base if isinstance(m, LoRALinear) else m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | LoRALinear)
    }
    with SafetensorsFile(path) as st:
        if not st.entries:
            raise LoRAError(path, "the file holds no tensors", "give a LoRA .safetensors file")
        flux3 = isinstance(model, Flux3Transformer)
        if is_lokr(st.entries):
            if flux3:
                raise LoRAError(
                    path,
                    "LoKr adapters are read for FLUX.2 [klein] only (diffusers reads none for FLUX 3)",
                    "give a LoRA file (lora_A/lora_B) trained for FLUX 3 [klein]",
                    next(k for k in st.entries if ".lokr_" in k),
                )
            fmt, kron = read_lokr(st, layers, max_scale)
            _warn_other_base(path, st.metadata, variant)
            return AdapterFile(path, fmt, dict(kron))
        fmt, parts = _parts(st, layers, _flux3_names(layers) if flux3 else _flux2_names)
        alpha = _metadata_alpha(st) if fmt == "diffusers" else None
        for part in parts:
            _check_shapes(st, part, layers[part.layer])
        updates = _combine(
            path, [(part, *_read_part(st, part, layers[part.layer], alpha, max_scale)) for part in parts]
        )
        _warn_other_base(path, st.metadata, variant)
    return AdapterFile(path, fmt, dict(updates))


def _flux2_names(name: str, prefixed: bool) -> Target | None:
    """A FLUX.2 diffusers layer name -> its target (`prefixed`: found under `diffusion_model.`, where diffusers'
    converter has normalised "transformer_blocks." to "sformer_blocks.", and so do we)."""
    if prefixed:
        name = re.sub(r"^sformer_blocks\.", "transformer_blocks.", name)
    return transformer_layer_from_diffusers(name)


def _flux3_names(layers: dict[str, nn.Linear]) -> Callable[[str, bool], Target | None]:
    """FLUX 3: a diffusers layer name -> its target, only for names diffusers' model has (the same under a prefix:
    diffusers' FLUX 3 converter leaves diffusers names as they are)."""
    table = flux3_keymaps.lora_layers_from_diffusers(layers)

    def target(name: str, prefixed: bool) -> Target | None:
        found = table.get(name)
        return None if found is None else (found[0], None, found[1])

    return target


def _parts(
    st: SafetensorsFile, layers: dict[str, nn.Linear], from_diffusers: Callable[[str, bool], Target | None]
) -> tuple[str, list[_Part]]:
    """The file's format and its (down, up) pairs mapped to our layers, from the key names alone (`from_diffusers`:
    the model family's reading of diffusers' layer names)."""
    keys = list(st.entries)
    if any(k.startswith("lora_unet_") for k in keys):
        fmt, prefix = "kohya", "lora_unet_"
    elif any(k.startswith("transformer.") for k in keys):
        fmt, prefix = "diffusers", "transformer."
    elif any(k.startswith(PREFIXES) for k in keys):
        fmt, prefix = "ai-toolkit", ""
    else:
        raise LoRAError(
            st.path,
            "the key is in no LoRA format we read (diffusers 'transformer.…lora_A.weight', kohya "
            "'lora_unet_…lora_down.weight', ai-toolkit 'diffusion_model.…lora_A.weight')",
            "give a LoRA trained for this model",
            keys[0],
        )
    by_flat = {name.replace(".", "_"): name for name in layers}
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        body = _body(st.path, key, prefix)
        layer, kind = _split(st.path, key, body)
        if kind in grouped[layer]:
            raise LoRAError(st.path, f"layer {layer!r} has two {kind} weights", "keep one of them", key)
        grouped[layer][kind] = key
    parts, diffusers_names, down_up = [], 0, False
    for layer, kinds in grouped.items():
        for needed in ("A", "B"):
            if needed not in kinds:
                name = "lora_A (lora_down)" if needed == "A" else "lora_B (lora_up)"
                raise LoRAError(
                    st.path,
                    f"layer {layer!r} has no {name} weight",
                    "the file is incomplete",
                    next(iter(kinds.values())),
                )
        down = kinds["A"]
        target: Target | None
        if "alpha" in kinds and fmt != "kohya":  # diffusers reads no alpha tensor in these layouts either
            raise LoRAError(
                st.path,
                f"{fmt} files carry no alpha tensor (diffusers keeps alpha in the metadata, ai-toolkit folds it in)",
                "fold alpha / rank into the up weights and remove the key",
                kinds["alpha"],
            )
        if fmt == "kohya":
            target = (by_flat[layer], None, False) if layer in by_flat else None
        elif fmt == "diffusers":
            target = from_diffusers(layer, False)
        elif layer in layers:  # ai-toolkit: BFL names
            target = (layer, None, False)
            down_up = down_up or ".lora_down." in down
        else:  # diffusers' names under the prefix
            target = from_diffusers(layer, True)
            diffusers_names += 1
        if target is None or target[0] not in layers:
            raise LoRAError(st.path, "it names no layer of this model", ANOTHER_MODEL, down)
        parts.append(_Part(target[0], target[1], target[2], down, kinds["B"], kinds.get("alpha")))
    if fmt == "ai-toolkit" and diffusers_names == len(parts):
        fmt = "diffusers names under a prefix"
    if down_up:  # diffusers 0.42 reads these as kohya keys, converts none of them and applies nothing
        log.info(
            "LoRA %s: lora_down/lora_up under diffusion_model. applied as ai-toolkit (diffusers ignores them)",
            st.path,
        )
    return fmt, parts


def _body(path: Path, key: str, prefix: str) -> str:
    if prefix:
        if not key.startswith(prefix):
            raise LoRAError(
                path, f"its file is in the {prefix}… layout but this key is not", "remove the key", key
            )
        return key[len(prefix) :]
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    raise LoRAError(
        path, f"its file is in the {PREFIXES[0]}… layout but this key is not", "remove the key", key
    )


def _split(path: Path, key: str, body: str) -> tuple[str, str]:
    """'<layer>.<kind>.weight' -> (layer, 'A' or 'B'), '<layer>.alpha' -> (layer, 'alpha')."""
    if body.endswith(".alpha"):
        return body.removesuffix(".alpha"), "alpha"
    for kind, side in _KINDS.items():
        if body.endswith(f".{kind}.weight"):
            return body.removesuffix(f".{kind}.weight"), side
    raise LoRAError(
        path,
        "it is not a LoRA weight (lora_A/lora_B, lora_down/lora_up or alpha; DoRA and full weights are not read)",
        "give a plain LoRA file",
        key,
    )


def _metadata_alpha(st: SafetensorsFile) -> float | None:
    """diffusers' `lora_adapter_metadata` (a PEFT LoraConfig, each entry prefixed "transformer.") -> lora_alpha."""
    text = st.metadata.get("lora_adapter_metadata")
    if text is None:
        return None
    key, fix = (
        "__metadata__.lora_adapter_metadata",
        "save the adapter again with diffusers' save_lora_weights",
    )
    packed = parse_json(text, st.path, "the adapter metadata", fix, key)
    if not isinstance(packed, dict):
        raise LoRAError(
            st.path, f"the adapter metadata is a JSON {type(packed).__name__}, not an object", fix, key
        )
    config = {k.removeprefix("transformer."): v for k, v in packed.items() if k.startswith("transformer.")}
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise LoRAError(st.path, "per-layer alpha or rank patterns are not supported", fix, key)
    alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(st.path, f"lora_alpha must be a positive number, got {alpha!r}", fix, key)
    return float(alpha)


def _check_shapes(st: SafetensorsFile, part: _Part, layer: nn.Linear) -> None:
    """The pair's dtypes and shapes against `layer`, from the header alone."""
    rows = layer.out_features if part.rows is None else layer.out_features // 3
    for key in (part.down, part.up):
        check_weight_dtype(st, key)
    down, up = st.entries[part.down].shape, st.entries[part.up].shape
    if len(down) != 2 or len(up) != 2 or down[0] < 1:
        raise LoRAError(
            st.path,
            f"down {list(down)} and up {list(up)} are not a rank ≥ 1 pair of matrices",
            "the adapter is broken: train or export it again",
            part.down,
        )
    rank = down[0]
    if down[1] != layer.in_features or up != (rows, rank) or rank > min(layer.in_features, rows):
        raise LoRAError(
            st.path,
            f"down {list(down)} and up {list(up)} do not fit layer {part.layer}, which maps {layer.in_features} to "
            f"{rows} features (down [rank, {layer.in_features}], up [{rows}, rank], rank ≤ {min(layer.in_features, rows)})",
            ANOTHER_MODEL,
            part.down,
        )
    if part.alpha is not None:
        check_alpha_entry(st, part.alpha)


def _read_part(
    st: SafetensorsFile, part: _Part, layer: nn.Linear, meta_alpha: float | None, max_scale: float
) -> tuple[Tensor, Tensor]:
    """The pair's tensors, alpha / rank folded into up, halves swapped where diffusers' order differs."""
    down, up = finite(st, part.down), finite(st, part.up)
    rank = down.shape[0]
    alpha = meta_alpha
    if part.alpha is not None:
        alpha = read_alpha(st, part.alpha)
    if alpha is not None:
        up = up * (alpha / rank)
    if part.swap:
        first, second = up.chunk(2, dim=0)
        up = torch.cat((second, first), dim=0)
    _check_magnitude(st.path, part.down, down, up, layer.in_features, max_scale)
    return down, up


def _check_magnitude(
    path: Path, key: str, down: Tensor, up: Tensor, in_features: int, max_scale: float
) -> None:
    """Refuse an update no trained adapter has (`check_row_norms`; about √rank·‖up_i‖ for a trained one, with a
    down of 1/√in entries). The row norms come from the rank x rank Gram matrix (float64), never from the full
    out x in product."""
    d, u = down.double(), up.double()
    rows = ((u @ (d @ d.T)) * u).sum(dim=1).clamp(min=0).sqrt()
    check_row_norms(path, key, float(rows.max()), in_features, max_scale)


def _combine(path: Path, read: list[tuple[_Part, Tensor, Tensor]]) -> dict[str, LowRank]:
    """One update per layer: parts of a fused q/k/v are stacked (down rows) into a block-diagonal up."""
    by_layer: dict[str, list[tuple[_Part, Tensor, Tensor]]] = defaultdict(list)
    for item in read:
        by_layer[item[0].layer].append(item)
    updates = {}
    for name, pieces in by_layer.items():
        if len(pieces) == 1 and pieces[0][0].rows is None:
            updates[name] = LowRank(pieces[0][1], pieces[0][2])
            continue
        if any(p.rows is None for p, _, _ in pieces) or len({p.rows for p, _, _ in pieces}) != len(pieces):
            raise LoRAError(
                path,
                f"layer {name} is given twice (by two names, or fused and split)",
                "keep one of them",
                pieces[0][0].down,
            )
        third = pieces[0][2].shape[0]
        rank = sum(down.shape[0] for _, down, _ in pieces)
        up = torch.zeros(3 * third, rank)
        downs, start = [], 0
        for p, down, part_up in sorted(pieces, key=lambda item: item[0].rows or 0):
            r = down.shape[0]
            assert p.rows is not None
            up[p.rows * third : (p.rows + 1) * third, start : start + r] = part_up
            downs.append(down)
            start += r
        updates[name] = LowRank(torch.cat(downs), up)
    return updates


def _warn_other_base(path: Path, metadata: dict[str, str], variant: str | None) -> None:
    """Warn when the file's metadata says it was trained for another model: a FLUX.1 or SDXL adapter whose layers
    happen to have our names and shapes loads, and makes noise. Not klein, or klein of another size (4B, 9B)."""
    if variant is None:
        return
    ours = re.search(r"(\d+)b", variant.lower())
    for field in BASE_MODEL_FIELDS:
        claim = metadata.get(field)
        if not claim:
            continue
        flat = re.sub(r"[^a-z0-9]", "", claim.lower())
        sizes = set(re.findall(r"(?<![0-9])(\d+)b", flat))
        other_size = ours is not None and sizes and ours.group(1) not in sizes
        if "klein" not in flat or other_size:
            log.warning(
                "LoRA %s: its metadata %s says it was trained for %r, but this model is %s: expect poor pictures "
                "unless it was made for FLUX.2 [klein] of this size",
                path,
                field,
                claim[:80],
                variant,
            )
