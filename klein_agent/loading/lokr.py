"""LoKr files (LyCORIS' Kronecker-product adapters) to `Kronecker` updates of our transformer's layers.

A LoKr layer stores delta W = w1 ⊗ w2 (peft `tuners/lokr/layer.py` make_kron): w1 [a, c] and w2 [b, d] with
a·b = out and c·d = in features, each factor either a full matrix (`lokr_w1`, `lokr_w2`) or two whose product it
is (`lokr_w1_a` @ `lokr_w1_b`, same for w2), plus an optional `alpha`. Layouts, told apart by their keys as
diffusers 0.42's `Flux2LoraLoaderMixin.lora_state_dict` tells them apart:
- BFL (ai-toolkit): `diffusion_model.<BFL layer>.lokr_w1` (PEFT's `base_model.model.` means the same), with the
  double blocks' q/k/v fused as BFL has them (diffusers `_convert_non_diffusers_flux2_lokr_to_diffusers`, which
  fuses diffusers' projections for them: a Kronecker product over the fused layer cannot be split into thirds);
- LyCORIS: `lycoris_<diffusers block path, dots as underscores>.lokr_w1` (`_convert_lycoris_flux2_lokr_to_diffusers`,
  blocks only), q, k and v separate: each becomes its own product on one third of our fused layer;
- diffusers: `transformer.<diffusers layer>.lokr_w1`, as PEFT holds it (no conversion in diffusers; no alpha keys).
Alpha as diffusers' `_bake_lokr_alpha_` has it: w1 scaled by alpha / rank when a factor is rank-decomposed (rank from
w2's decomposition, else w1's), ignored when both are full matrices (LyCORIS then runs at scale 1).

Checked as LoRA files are (`klein_agent.loading.lora`): the header first, every key mapped to a layer and every
factor's shape checked so the product is exactly the layer's (or the third's) shape and a decomposition's rank at
most its factor's smaller side, so no factor is larger than the layer; then the tensors, one at a time, finite, and
the update not absurdly large. Factors are kept as the file has them and applied at call time (see
`klein_agent.model.lora.KroneckerPiece`), never multiplied out. Every refusal is a LoRAError naming the file and key.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from klein_agent.loading.adapter_values import (
    BROKEN,
    check_alpha_entry,
    check_row_norms,
    check_weight_dtype,
    finite,
    read_alpha,
)
from klein_agent.loading.errors import LoRAError
from klein_agent.loading.keymaps import transformer_layer_from_diffusers
from klein_agent.loading.safetensors_file import SafetensorsFile
from klein_agent.model.lora import Kronecker, KroneckerPiece

__all__ = ["is_lokr", "read_lokr"]

FACTOR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
KEYS = (*FACTOR_KEYS, "alpha")
BFL_PREFIXES = ("diffusion_model.", "base_model.model.")
LAYOUTS = (
    "BFL 'diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1', LyCORIS "
    "'lycoris_transformer_blocks_0_attn_to_q.lokr_w1' or diffusers 'transformer.transformer_blocks.0.attn.to_q.lokr_w1'"
)
ANOTHER_MODEL = "the LoKr is for another model or klein size: use one trained for this model"
# The block sub-paths LyCORIS writes with underscores, decoded as diffusers decodes them (the same set, so a file
# loads here exactly when it loads there).
LYCORIS_SUBPATHS = {
    "attn_to_q": "attn.to_q",
    "attn_to_k": "attn.to_k",
    "attn_to_v": "attn.to_v",
    "attn_to_out_0": "attn.to_out.0",
    "attn_to_add_out": "attn.to_add_out",
    "attn_add_q_proj": "attn.add_q_proj",
    "attn_add_k_proj": "attn.add_k_proj",
    "attn_add_v_proj": "attn.add_v_proj",
    "attn_to_qkv_mlp_proj": "attn.to_qkv_mlp_proj",
    "attn_to_out": "attn.to_out",
    "ff_linear_in": "ff.linear_in",
    "ff_linear_out": "ff.linear_out",
    "ff_context_linear_in": "ff_context.linear_in",
    "ff_context_linear_out": "ff_context.linear_out",
}
_LYCORIS = re.compile(r"^lycoris_((?:single_)?transformer_blocks)_(\d+)_(.+)$")


def is_lokr(keys: Iterable[str]) -> bool:
    """Whether a file's keys are LoKr's (any `.lokr_` key, diffusers' test)."""
    return any(".lokr_" in key for key in keys)


@dataclass
class _Module:
    """One LoKr layer of the file: its keys by suffix, and where it goes."""

    name: str  # as the file names it (messages)
    layer: str  # our layer name
    third: int | None  # which third of a fused q/k/v, or None for the whole layer
    swap: bool  # diffusers' final modulation is [scale; shift], BFL's [shift; scale]
    keys: dict[str, str]  # suffix ("lokr_w1", ..., "alpha") -> key


def read_lokr(
    st: SafetensorsFile, layers: dict[str, nn.Linear], max_scale: float
) -> tuple[str, dict[str, Kronecker]]:
    """The LoKr file `st` for the model whose linear layers are `layers` (our names): its layout ("BFL LoKr",
    "LyCORIS LoKr" or "diffusers LoKr") and one update per layer. `max_scale` (rules.loras.MAX_LORA_SCALE) bounds
    its values. Raises LoRAError, naming the file, the key and the fix; no tensor is read before every shape fits."""
    fmt, modules = _modules(st, layers)
    for module in modules:
        _check_shapes(st, module, layers[module.layer])
    read = [(module, *_read(st, module, layers[module.layer], max_scale)) for module in modules]
    return fmt, _combine(st, read, layers)


def _modules(st: SafetensorsFile, layers: dict[str, nn.Linear]) -> tuple[str, list[_Module]]:
    """The file's layout and its layers, from the key names alone."""
    keys = list(st.entries)
    if any(k.startswith("lycoris_") for k in keys):
        fmt, prefix = "LyCORIS LoKr", "lycoris_"
    elif any(k.startswith("transformer.") for k in keys):
        fmt, prefix = "diffusers LoKr", "transformer."
    elif any(k.startswith(BFL_PREFIXES) for k in keys):
        fmt, prefix = "BFL LoKr", ""
    else:
        raise LoRAError(
            st.path,
            f"the key is in no LoKr layout we read ({LAYOUTS})",
            "give a FLUX.2 [klein] LoKr",
            keys[0],
        )
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        name, _, suffix = key.rpartition(".")
        if suffix not in KEYS or not name:
            raise LoRAError(
                st.path,
                f"a LoKr file holds only {', '.join(FACTOR_KEYS)} and alpha keys (no LoRA, DoRA, Tucker or full weights)",
                "give a plain LoKr file, or the LoRA and the LoKr as two files",
                key,
            )
        if not (key.startswith(prefix) if prefix else key.startswith(BFL_PREFIXES)):
            raise LoRAError(
                st.path, f"its file is in the {fmt} layout but this key is not", "remove the key", key
            )
        grouped[name][suffix] = key
    modules = []
    for name, by_suffix in grouped.items():
        first = next(iter(by_suffix.values()))
        target = _target(name, fmt, layers)
        if target is None:
            raise LoRAError(st.path, "it names no layer of this model", ANOTHER_MODEL, first)
        if (
            fmt == "diffusers LoKr" and "alpha" in by_suffix
        ):  # diffusers refuses these too (not a lora/lokr key)
            raise LoRAError(
                st.path,
                "diffusers LoKr files carry no alpha tensor (it is baked into lokr_w1)",
                "fold alpha / rank into lokr_w1 and remove the key",
                by_suffix["alpha"],
            )
        modules.append(_Module(name, *target, by_suffix))
    return fmt, modules


def _target(name: str, fmt: str, layers: dict[str, nn.Linear]) -> tuple[str, int | None, bool] | None:
    """A module name of the file -> (our layer, third, swap), or None."""
    if fmt == "BFL LoKr":
        for p in BFL_PREFIXES:
            name = name.removeprefix(p)
        return (name, None, False) if name in layers else None
    if fmt == "diffusers LoKr":
        target = transformer_layer_from_diffusers(name.removeprefix("transformer."))
    else:
        found = _LYCORIS.match(name)
        sub = LYCORIS_SUBPATHS.get(found.group(3)) if found else None
        if found is None or sub is None:
            return None
        target = transformer_layer_from_diffusers(f"{found.group(1)}.{found.group(2)}.{sub}")
    return target if target is not None and target[0] in layers else None


def _factor(st: SafetensorsFile, module: _Module, side: str) -> tuple[str, ...]:
    """The keys of factor `side` ("w1" or "w2"): (full,) or (a, b); refuses a missing or doubled half."""
    keys = module.keys
    full, a, b = (f"lokr_{side}", f"lokr_{side}_a", f"lokr_{side}_b")
    if full in keys:
        if a in keys or b in keys:
            raise LoRAError(
                st.path,
                f"layer {module.name!r} gives {side} both whole and decomposed",
                "keep one of them",
                keys[full],
            )
        return (keys[full],)
    if a in keys and b in keys:
        return keys[a], keys[b]
    some = keys.get(a) or keys.get(b) or next(iter(keys.values()))
    raise LoRAError(
        st.path,
        f"layer {module.name!r} has no {full} (nor both {a} and {b}): a LoKr layer needs both Kronecker factors",
        "the file is incomplete: export it again",
        some,
    )


def _check_shapes(st: SafetensorsFile, module: _Module, layer: nn.Linear) -> None:
    """The factors' dtypes and shapes against `layer`, from the header alone: w1 [a, c] ⊗ w2 [b, d] must be the
    layer's (or its third's) [rows, in] exactly, and a decomposition's rank at most its factor's smaller side."""
    rows = layer.out_features if module.third is None else layer.out_features // 3
    dims = []
    for side in ("w1", "w2"):
        keys = _factor(st, module, side)
        for key in keys:
            check_weight_dtype(st, key)
            shape = st.entries[key].shape
            if len(shape) != 2 or min(shape) < 1:
                raise LoRAError(
                    st.path, f"shape {list(shape)} is not a matrix with both sides ≥ 1", BROKEN, key
                )
        shapes = [st.entries[key].shape for key in keys]
        if len(shapes) == 2:
            (x, r), (r2, y) = shapes
            if r != r2:
                raise LoRAError(
                    st.path,
                    f"lokr_{side}_a {list(shapes[0])} and lokr_{side}_b {list(shapes[1])} disagree on the rank "
                    f"({r} and {r2}): a [{x}, rank] and b [rank, {y}] multiply to the factor",
                    BROKEN,
                    keys[0],
                )
            if r > min(x, y):
                raise LoRAError(
                    st.path,
                    f"lokr_{side}_a {list(shapes[0])} and lokr_{side}_b {list(shapes[1])} decompose a [{x}, {y}] factor "
                    f"at rank {r}, above its smaller side {min(x, y)}",
                    BROKEN,
                    keys[0],
                )
            dims.append((x, y))
        else:
            dims.append((shapes[0][0], shapes[0][1]))
    (a, c), (b, d) = dims
    if a * b != rows or c * d != layer.in_features:
        where = f"layer {module.layer}" + ("" if module.third is None else " (one third of it)")
        raise LoRAError(
            st.path,
            f"w1 [{a}, {c}] ⊗ w2 [{b}, {d}] is a [{a * b}, {c * d}] update, but {where} maps {layer.in_features} to "
            f"{rows} features (w1 [a, c], w2 [b, d] with a·b = {rows} and c·d = {layer.in_features})",
            ANOTHER_MODEL,
            module.keys.get("lokr_w1") or module.keys["lokr_w1_a"],
        )
    if "alpha" in module.keys:
        check_alpha_entry(st, module.keys["alpha"])


def _read(
    st: SafetensorsFile, module: _Module, layer: nn.Linear, max_scale: float
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The factors' tensors (float32), alpha / rank folded into w1's first matrix as diffusers bakes it."""
    w1 = [finite(st, key) for key in _factor(st, module, "w1")]
    w2 = [finite(st, key) for key in _factor(st, module, "w2")]
    alpha_key = module.keys.get("alpha")
    if alpha_key is not None:
        alpha = read_alpha(st, alpha_key)
        rank = w2[1].shape[0] if len(w2) == 2 else w1[1].shape[0] if len(w1) == 2 else None
        if rank is not None:  # both factors whole: LyCORIS applies no alpha
            w1[0] = w1[0] * (alpha / rank)
    # A row (i, j) of w1 ⊗ w2 is w1_i ⊗ w2_j, whose norm is ‖w1_i‖·‖w2_j‖: the largest row is the product of the
    # factors' largest rows, found without the product.
    worst = float(_row_norms(w1).max()) * float(_row_norms(w2).max())
    check_row_norms(
        st.path, module.keys.get("lokr_w1") or module.keys["lokr_w1_a"], worst, layer.in_features, max_scale
    )
    return tuple(w1), tuple(w2)


def _row_norms(chain: list[Tensor]) -> Tensor:
    """The row norms of the chain's product (float64), for a pair from the rank x rank Gram matrix."""
    if len(chain) == 1:
        return chain[0].double().norm(dim=1)
    a, b = chain[0].double(), chain[1].double()
    return ((a @ (b @ b.T)) * a).sum(dim=1).clamp(min=0).sqrt()


def _combine(
    st: SafetensorsFile,
    read: list[tuple[_Module, tuple[Tensor, ...], tuple[Tensor, ...]]],
    layers: dict[str, nn.Linear],
) -> dict[str, Kronecker]:
    """One update per layer: a whole layer's product, or the thirds' products of a fused q/k/v in their rows."""
    by_layer: dict[str, list[tuple[_Module, tuple[Tensor, ...], tuple[Tensor, ...]]]] = defaultdict(list)
    for item in read:
        by_layer[item[0].layer].append(item)
    updates = {}
    for name, items in by_layer.items():
        out = layers[name].out_features
        # a file names each of its layers once, and only the split layouts fill thirds: no two pieces overlap
        assert len({m.third for m, _, _ in items}) == len(items) and (
            len(items) == 1 or items[0][0].third is not None
        )
        pieces = sorted(
            (KroneckerPiece(0 if m.third is None else m.third * (out // 3), w1, w2) for m, w1, w2 in items),
            key=lambda p: p.start,
        )
        roll = out // 2 if items[0][0].swap else 0
        updates[name] = Kronecker(tuple(pieces), out, roll)
    return updates
