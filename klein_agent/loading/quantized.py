"""BFL's pre-quantized transformer files (`fp8r`, `nvfp4`), read as diffusers' `BFLQuantizationConfig` reads them.

The layouts (diffusers 0.42.1, `diffusers/quantizers/bfl/`). A linear layer `P` is quantized when the file holds
`P.weight_scale`; it is nvfp4 when it also holds `P.weight_scale_2`, fp8r otherwise:

- fp8r: `P.weight` float8_e4m3fn [N, K] and `P.weight_scale` [N], one float scale per output row (an optional
  `P.input_scale` is ignored, as diffusers ignores it).
- nvfp4 (NVIDIA ModelOpt's layout): `P.weight` uint8 [N, K/2], two E2M1 codes per byte (the even element in the low
  nibble), `P.weight_scale` float8_e4m3fn [N, K/16] (one scale per 16 inputs), `P.weight_scale_2` the float global
  scale and `P.input_scale` the calibrated activation scale (both scalars; the activation scale only matters to a
  Blackwell FP4 kernel, which is not used here).

Dequantization is diffusers' own arithmetic (`dequantize_fp8r`, `dequantize_nvfp4`), in float32, then cast to the
model's dtype, so a dequantized layer holds exactly the weight the reference computes in every forward pass.

Everything here works on meta tensors as well as real ones: the loader first runs it on the shapes and dtypes the
file's header declares, so a bad file is refused, key named, before a byte of its data is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from klein_agent.loading.errors import CheckpointError

FP8R, NVFP4 = "fp8r", "nvfp4"
NVFP4_BLOCK = 16  # inputs sharing one E4M3 block scale
_SCALE = ".weight_scale"
_GLOBAL_SCALE = ".weight_scale_2"
_INPUT_SCALE = ".input_scale"
# E2M1 values by their 4-bit code: bit 3 is the sign, bits 2-0 index the magnitude (diffusers' E2M1_LUT)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FIX = "re-download or re-export the file (its scales must come with every quantized weight)"

StateDict = dict[str, Tensor]
# (our layer name, e4m3 weight [N, K], per-row scale [N]) -> a module that runs it in FP8, or None to dequantize
Fp8LinearFactory = Callable[[str, Tensor, Tensor], torch.nn.Module | None]


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized linear layer as stored: the weight and its scales (`weight_scale_2` for nvfp4 only)."""

    kind: str  # FP8R or NVFP4
    weight: Tensor  # fp8r: e4m3 [N, K]; nvfp4: uint8 [N, K/2]
    weight_scale: Tensor  # fp8r: [N]; nvfp4: e4m3 [N, K/16]
    weight_scale_2: Tensor | None = None  # nvfp4: a scalar

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's logical [N, K] (an nvfp4 byte holds two inputs)."""
        rows, cols = self.weight.shape
        return (rows, 2 * cols) if self.kind == NVFP4 else (rows, cols)

    @property
    def stored_bytes(self) -> int:
        """Bytes the layer takes as stored (weight and scales)."""
        parts = [self.weight, self.weight_scale] + (
            [self.weight_scale_2] if self.weight_scale_2 is not None else []
        )
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass(frozen=True)
class QuantizedSummary:
    """What a quantized file held and what loading did with it, for the log line."""

    kinds: tuple[str, ...]  # the layouts found, e.g. ("fp8r",)
    layers: int  # quantized linear layers in the file (q, k and v count apart in the diffusers layout)
    kept_fp8: int  # model layers kept in FP8 (run by `Fp8LinearFactory` modules); the rest were dequantized
    extra_bytes: int  # memory the dequantized layers take beyond their stored size


def split_quantized(state: Mapping[str, Tensor], where: str) -> tuple[StateDict, dict[str, QuantizedLayer]]:
    """The plain tensors and the quantized layers (keyed by their `P.weight` key) of a checkpoint's state.

    Checks each layer against its own layout: the weight present with the layout's dtype, the scales present with
    theirs and shaped after the weight (fp8r [N]; nvfp4 [N, K/16] and two scalars), K a multiple of 16 for nvfp4.
    A float8 or uint8 weight without scales in a file that has scales elsewhere is refused too (a lost scale).
    Raises CheckpointError naming `where`, the key, what is wrong and the fix.
    """
    prefixes = sorted(k.removesuffix(_SCALE) for k in state if k.endswith(_SCALE))
    layers: dict[str, QuantizedLayer] = {}
    for prefix in prefixes:
        layers[f"{prefix}.weight"] = _layer(state, prefix, where)
    for suffix in (_GLOBAL_SCALE, _INPUT_SCALE):
        for key in state:
            if key.endswith(suffix) and f"{key.removesuffix(suffix)}{_SCALE}" not in state:
                raise _refuse(where, key, f"it has no {key.removesuffix(suffix)}{_SCALE} beside it")
    used = {f"{p}{s}" for p in prefixes for s in (_SCALE, _GLOBAL_SCALE, _INPUT_SCALE, ".weight")}
    plain = {k: v for k, v in state.items() if k not in used}
    if layers:
        for key, tensor in plain.items():
            if tensor.dtype in (torch.float8_e4m3fn, torch.uint8) and key.endswith(".weight"):
                raise _refuse(
                    where,
                    key,
                    f"it is {_name(tensor.dtype)} but has no {key.removesuffix('.weight')}{_SCALE}, "
                    "so it cannot be dequantized",
                )
    return plain, layers


def _layer(state: Mapping[str, Tensor], prefix: str, where: str) -> QuantizedLayer:
    scale = state[f"{prefix}{_SCALE}"]
    scale_2 = state.get(f"{prefix}{_GLOBAL_SCALE}")
    input_scale = state.get(f"{prefix}{_INPUT_SCALE}")
    kind = NVFP4 if scale_2 is not None else FP8R
    weight = state.get(f"{prefix}.weight")
    if weight is None:
        raise _refuse(where, f"{prefix}{_SCALE}", f"it scales {prefix}.weight, which the file does not hold")
    want = torch.uint8 if kind == NVFP4 else torch.float8_e4m3fn
    if weight.dtype != want or weight.ndim != 2:
        raise _refuse(
            where,
            f"{prefix}.weight",
            f"it is {_name(weight.dtype)} {_shape(weight)}, but the {kind} layout stores a 2-D {_name(want)} weight",
        )
    rows, cols = weight.shape
    if kind == FP8R:
        _expect(where, f"{prefix}{_SCALE}", scale, (rows,), "a floating-point scale per weight row")
        return QuantizedLayer(kind, weight, scale)
    if input_scale is None:
        raise _refuse(where, f"{prefix}{_GLOBAL_SCALE}", f"nvfp4 needs {prefix}{_INPUT_SCALE} beside it")
    if (2 * cols) % NVFP4_BLOCK:
        raise _refuse(
            where,
            f"{prefix}.weight",
            f"its {2 * cols} inputs ({cols} bytes of two) are not a multiple of the {NVFP4_BLOCK}-input nvfp4 block",
        )
    blocks = (rows, 2 * cols // NVFP4_BLOCK)
    _expect(
        where, f"{prefix}{_SCALE}", scale, blocks, "a float8_e4m3fn scale per 16 inputs", torch.float8_e4m3fn
    )
    _expect(where, f"{prefix}{_GLOBAL_SCALE}", scale_2, (), "one floating-point number")
    _expect(where, f"{prefix}{_INPUT_SCALE}", input_scale, (), "one floating-point number")
    return QuantizedLayer(kind, weight, scale, scale_2)


def _expect(
    where: str,
    key: str,
    t: Tensor | None,
    shape: tuple[int, ...],
    what: str,
    dtype: torch.dtype | None = None,
) -> None:
    assert t is not None
    scalar_ok = shape == () and t.numel() == 1 and t.ndim <= 1
    dtype_ok = t.dtype == dtype if dtype is not None else t.is_floating_point() and t.element_size() > 1
    if not dtype_ok or not (tuple(t.shape) == shape or scalar_ok):
        want = f"shape {list(shape)}" if shape else "a scalar"
        raise _refuse(where, key, f"it is {_name(t.dtype)} {_shape(t)}; the layout wants {what}, {want}")


def dequantize(layer: QuantizedLayer, dtype: torch.dtype) -> Tensor:
    """The layer's weight [N, K] in `dtype`: diffusers' float32 dequantization, then one cast. On meta tensors, an
    empty meta tensor of that shape."""
    if layer.weight.is_meta:
        return torch.empty(layer.shape, dtype=dtype, device="meta")
    if layer.kind == FP8R:
        return (layer.weight.float() * layer.weight_scale.float()[:, None]).to(dtype)
    assert layer.weight_scale_2 is not None
    codes = torch.stack((layer.weight & 0x0F, layer.weight >> 4), dim=-1).reshape(layer.weight.shape[0], -1)
    values = torch.tensor(E2M1_VALUES, device=codes.device)[codes.long()]
    scale = layer.weight_scale.float() * layer.weight_scale_2.float().reshape(())
    return (values * scale.repeat_interleave(NVFP4_BLOCK, dim=1)).to(dtype)


def to_model_names(
    state: Mapping[str, Tensor],
    rename: Callable[[StateDict], StateDict],
    dtype: torch.dtype,
    where: str,
    fp8_linear: Fp8LinearFactory | None = None,
) -> tuple[StateDict, dict[str, torch.nn.Module], QuantizedSummary | None]:
    """A checkpoint's state in the model's names with its quantized layers resolved: (state, FP8 modules by layer
    name, summary or None for a file without scales).

    `rename` is the layout's key map (`keymaps.transformer_from_diffusers`, `keymaps.strip_prefix`); its reshapes
    (fusing q, k and v, swapping the final modulation's halves) all move whole rows, so an fp8r weight keeps its
    scales by passing them through the same map. nvfp4 layers are dequantized first (their global scale is one per
    tensor, and cannot follow a fusion). Each fp8r layer then goes to `fp8_linear`, whose module takes the weight
    and scale as stored; where it gives None (or there is none) the layer is dequantized to `dtype`.
    Raises CheckpointError (see `split_quantized`), also when a fused layer mixes fp8r with other parts.
    """
    plain, layers = split_quantized(state, where)
    if not layers:
        return rename(plain), {}, None
    fp8 = {k: q for k, q in layers.items() if q.kind == FP8R}
    merged = dict(plain)
    extra = 0
    for key, layer in layers.items():
        merged[key] = layer.weight if layer.kind == FP8R else dequantize(layer, dtype)
        if layer.kind == NVFP4:
            extra += merged[key].numel() * merged[key].element_size() - layer.stored_bytes
    out = rename(merged)
    scales = rename({k: q.weight_scale for k, q in fp8.items()})
    for key, scale in scales.items():
        if key not in out or out[key].dtype != torch.float8_e4m3fn or out[key].shape[0] != scale.shape[0]:
            raise _refuse(
                where,
                key,
                "it is fp8r but a layer it is fused with (q, k, v) is stored otherwise: quantize them alike",
            )
    modules: dict[str, torch.nn.Module] = {}
    for key, scale in scales.items():
        name = key.removesuffix(".weight")
        module = None if fp8_linear is None or out[key].is_meta else fp8_linear(name, out[key], scale)
        if module is not None:
            modules[name] = module
            del out[key]
            continue
        stored = out[key].numel() + scale.numel() * scale.element_size()
        out[key] = dequantize(QuantizedLayer(FP8R, out[key], scale), dtype)
        extra += out[key].numel() * out[key].element_size() - stored
    summary = QuantizedSummary(
        kinds=tuple(sorted({q.kind for q in layers.values()})),
        layers=len(layers),
        kept_fp8=len(modules),
        extra_bytes=extra,
    )
    return out, modules, summary


def _refuse(where: str, key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}, key {key!r}: {problem}; {FIX}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t: Tensor) -> str:
    return str(list(t.shape))
