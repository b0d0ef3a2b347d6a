"""FP8 (e4m3) weights and activations for the transformer blocks' linear layers, for Hopper and newer GPUs.

Recipe: per-tensor scaling on both sides. Each weight is stored once as float8_e4m3fn with a float32 scale
amax(|W|) / 448; each activation is quantized on the fly with its own amax(|x|) / 448 (dynamic scaling, no
calibration). On a CUDA device of compute capability 8.9 or newer (Ada, Hopper, Blackwell) the matmul is
`torch._scaled_mm` on the FP8 tensor cores; everywhere else a reference path computes the same quantized product in
float32, so CPU tests check the numerics the GPU runs, and the choice between the two is explicit
(`scaled_mm_available`, `Float8Linear.force_reference`).

Only the block linears (double_blocks.*, single_blocks.*; FLUX 3: content_mode_blocks.*, txt_mode_blocks.* and its
joint single_blocks.*) are converted; the embedders, the shared modulations and
the final layer stay in high precision, the same split as BFL's published FP8 checkpoints: Hugging Face
`black-forest-labs/FLUX.2-klein-4b-fp8` ships `flux-2-klein-4b-fp8.safetensors` at 4.07 GB, which is the
4B's 3.68 G block-linear weights at 1 byte plus its other 0.20 G parameters at 2 bytes. They are the large
majority of the FLOPs, and every one of them is wide enough for FP8 tensor cores to pay off.

Two recipes (`recipe_for`). With `--compile` (`FAST_RECIPE`): rowwise scales (one per weight output channel and
one per activation token, so a few large tokens or channels no longer flatten everyone else's precision) and
cuBLASLt's fast accumulation (`use_fast_accum=True`: partial sums kept in the tensor cores' own precision, the
recipe torchao and the FP8 training recipes use for forward passes). Without `--compile` (`EXACT_RECIPE`):
per-tensor scales and exact accumulation, with a warning: in eager mode the activation quantization (amax, divide,
clamp, cast) is several extra passes over each activation, which eats much of the FP8 matmul's gain; compiled, they
fuse into one kernel before the matmul (torchao's float8 linears show the same, pytorch/ao issue #685: slower than
16-bit layers in eager mode, faster compiled), and the rowwise amax is one more reduction that only pays fused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.model.transformer import Flux2Transformer

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448; e4m3fn has no infinity: a cast above it gives NaN
# A zero tensor has amax 0; flooring the scale keeps the division finite and still maps zeros to zeros.
_MIN_SCALE = 1e-12
# _scaled_mm (cuBLASLt FP8) wants the inner and the output dimension to be multiples of 16.
_ALIGNMENT = 16
# FLUX.2's double and single blocks; FLUX 3's mode blocks (image, references, text) and joint blocks (`single_blocks`)
_BLOCK_PREFIXES = ("double_blocks.", "single_blocks.", "content_mode_blocks.", "txt_mode_blocks.")


def scaled_mm_available(device: torch.device | str) -> bool:
    """Whether `torch._scaled_mm` with float8_e4m3fn runs on `device`: CUDA (not ROCm) with compute capability 8.9+.

    Float8Linear asks this when its weight arrives on a device, never inside forward, so compiled blocks trace no
    device queries (only a bool attribute, which Dynamo guards on).
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor) >= (8, 9)


@dataclass(frozen=True)
class Fp8Recipe:
    """How the block linears are quantized: rowwise or per-tensor scales, fast or exact accumulation."""

    rowwise: bool
    use_fast_accum: bool


FAST_RECIPE = Fp8Recipe(rowwise=True, use_fast_accum=True)
EXACT_RECIPE = Fp8Recipe(rowwise=False, use_fast_accum=False)
FP8_WITHOUT_COMPILE = (
    "--fp8 without --compile: the activations' quantization runs as separate passes (slower than bfloat16 on most "
    "GPUs), so the per-tensor recipe with exact accumulation is used; add --compile for rowwise scales and fast "
    "accumulation, fused"
)


def recipe_for(compiled: bool) -> Fp8Recipe:
    """The rule: rowwise scales and fast accumulation only when the blocks are compiled (see the module docstring);
    the caller warns with FP8_WITHOUT_COMPILE otherwise."""
    return FAST_RECIPE if compiled else EXACT_RECIPE


def quantize_e4m3_rowwise(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row quantization of a 2-D tensor: (float8_e4m3fn [R, C], float32 scales [R, 1]) with
    t ≈ q.float() * scale, each row's largest magnitude mapped onto 448 (as `quantize_e4m3`, row by row)."""
    if t.ndim != 2:
        raise ValueError(f"rowwise quantization takes a 2-D tensor, got shape {tuple(t.shape)}")
    t32 = t.detach().float()
    scale = t32.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_SCALE) / FP8_MAX
    q = (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_e4m3(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor quantization: (float8_e4m3fn tensor, float32 scalar scale) with t ≈ q.float() * scale.

    The scale maps the largest magnitude onto 448, the largest finite e4m3 value; the clamp guards the values that
    round above it (e4m3fn has no infinity, so an overflow would be NaN). Computed from float32 so a bf16 input's
    amax and the division are exact enough not to add error of their own.
    """
    t32 = t.detach().float()
    scale = t32.abs().amax().clamp(min=_MIN_SCALE) / FP8_MAX
    q = (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


class Float8Linear(nn.Module):
    """A bias-free linear layer with an e4m3 weight and dynamic e4m3 activations, scaled per tensor or per row.

    `weight` [out, in] float8_e4m3fn and `weight_scale` (float32: one element, or [out, 1] with `rowwise`) are
    buffers, so they follow `.to(device)` and appear in the state dict. With `rowwise`, each activation row (token)
    gets its own scale too. The output has the input's dtype.
    """

    weight: Tensor
    weight_scale: Tensor

    def __init__(
        self,
        weight: Tensor,  # [out, in] float8_e4m3fn
        weight_scale: Tensor,  # float32, one element
        *,
        use_fast_accum: bool = False,
        force_reference: bool = False,
        rowwise: bool = False,
    ) -> None:
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.ndim != 2:
            raise ValueError(f"expected a 2-D {FP8_DTYPE} weight, got {weight.dtype} {tuple(weight.shape)}")
        scale_shape = (weight.shape[0], 1) if rowwise else ()
        if weight_scale.numel() != (weight.shape[0] if rowwise else 1):
            kind = (
                f"a rowwise scale of shape {scale_shape}" if rowwise else "a per-tensor (one-element) scale"
            )
            raise ValueError(f"expected {kind}, got shape {tuple(weight_scale.shape)}")
        self.rowwise = rowwise
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().reshape(scale_shape).to(torch.float32))
        # cuBLASLt's fast accumulation keeps partial sums in the tensor cores' reduced precision (faster, slightly
        # less exact); off by default so the GPU path computes what the reference path checks.
        self.use_fast_accum = use_fast_accum
        # Tests, and GPUs where _scaled_mm misbehaves, can pin the reference path.
        self.force_reference = force_reference
        self.aligned = self.in_features % _ALIGNMENT == 0 and self.out_features % _ALIGNMENT == 0
        self.kernel_available = scaled_mm_available(self.weight.device)  # refreshed by every device move

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> Float8Linear:
        """Quantize an existing layer on whatever device it lives on (one layer at a time in float32: the peak
        extra memory is that one layer, not the model)."""
        if linear.bias is not None:
            raise ValueError("Float8Linear has no bias; the FLUX.2 transformer's linears have none either")
        quantize = quantize_e4m3_rowwise if kwargs.get("rowwise") else quantize_e4m3
        weight, scale = quantize(linear.weight)
        return cls(weight, scale, **kwargs)

    @property
    def uses_scaled_mm(self) -> bool:
        """Which path forward takes: the FP8 tensor-core kernel, or the float32 reference. Inputs must live on the
        weight's device, as for any layer, so the weight's device decides."""
        return not self.force_reference and self.aligned and self.kernel_available

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] -> [..., out] in `x`'s dtype; `x` is quantized to e4m3 with its own scale per call."""
        x2d = x.reshape(-1, self.in_features)
        x_q, x_scale = quantize_e4m3_rowwise(x2d) if self.rowwise else quantize_e4m3(x2d)
        # cuBLASLt's rowwise FP8 product writes bfloat16 only; other dtypes take the reference path
        w_scale = self.weight_scale.t() if self.rowwise else self.weight_scale  # [1, out] or scalar
        if self.uses_scaled_mm and (not self.rowwise or x.dtype == torch.bfloat16):
            # Row-major activations times a column-major weight: `weight.t()` of the row-major [out, in] buffer is
            # exactly the [in, out] column-major layout _scaled_mm requires, so no copy is made. Scales are the
            # dequantization multipliers: out = (x_q @ w_q^T) * x_scale * w_scale ([M, 1] and [1, N] rowwise).
            out = torch._scaled_mm(
                x_q.contiguous(),
                self.weight.t(),
                scale_a=x_scale,
                scale_b=w_scale,
                out_dtype=x.dtype,
                use_fast_accum=self.use_fast_accum,
            )
        else:
            out = _reference_scaled_mm(x_q, self.weight, x_scale, w_scale).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Float8Linear:
        # Module.to(dtype) / .half() / .bfloat16() cast every floating tensor, float8 included: that would turn the
        # weight back into bf16 and round the float32 scale. Keep the device move, refuse the dtype change: a buffer
        # whose dtype changed is replaced by the original moved to the new device.
        originals = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        self.kernel_available = scaled_mm_available(self.weight.device)
        return self

    def extra_repr(self) -> str:
        """The sizes and the FP8 dtype, for `print(model)`."""
        scales = "rowwise" if self.rowwise else "per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={FP8_DTYPE}, {scales}"


def _reference_scaled_mm(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """What _scaled_mm computes, in float32: products of e4m3 values are exact in float32, partial sums are float32,
    and the two scales multiply the accumulated result (not the operands), as the kernel's epilogue does; rowwise
    scales ([M, 1] and [1, N]) broadcast over the product. Fast accumulation has no reference: it is the kernel's
    own rounding of partial sums."""
    return F.linear(x_q.float(), w_q.float()) * (x_scale * w_scale)


def prequantized_linear_factory(
    device: torch.device, dtype: torch.dtype
) -> Callable[[str, Tensor, Tensor], nn.Module | None] | None:
    """What runs the fp8r layers of BFL's pre-quantized files here (`loading.quantized.Fp8LinearFactory`), or None
    where nothing would run them in FP8 (no `_scaled_mm` on `device`, or a dtype other than bfloat16, the only one
    cuBLASLt's rowwise product writes), so the loader dequantizes them.

    Kept layers are rowwise Float8Linear with fast accumulation: the file's per-row scales, activations quantized
    per token, as diffusers' `BFLFP8RLinear` runs them on the same GPUs. Layers whose sizes are not multiples of 16
    (which `_scaled_mm` refuses) are left to be dequantized, as diffusers dequantizes them.
    """
    if dtype != torch.bfloat16 or not scaled_mm_available(device):
        return None

    def make(name: str, weight: Tensor, row_scale: Tensor) -> nn.Module | None:
        if weight.shape[0] % _ALIGNMENT or weight.shape[1] % _ALIGNMENT:
            return None
        return Float8Linear(weight, row_scale.float(), rowwise=True, use_fast_accum=True)

    return make


def is_block_linear(name: str) -> bool:
    """A linear layer inside a double- or single-stream block (the layers BFL's FP8 files store in FP8), or a FLUX 3
    mode or joint block."""
    return name.startswith(_BLOCK_PREFIXES)


def quantize_transformer_(
    model: Flux2Transformer | Flux3Transformer,
    *,
    include: Callable[[str, nn.Linear], bool] | None = None,
    use_fast_accum: bool = False,
    rowwise: bool = False,
) -> list[str]:
    """Replace the block linears of `model` in place by Float8Linear; returns the replaced module names.

    `include(name, linear)` narrows the selection further (it is only asked about block linears). Works on a model
    already on its device, in any floating dtype; later device moves carry the FP8 layers along and later dtype casts
    leave them alone (see `Float8Linear._apply`). Layers already converted are skipped, so calling it twice converts
    nothing the second time.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and is_block_linear(name)
        and (include is None or include(name, module))
    ]
    replaced = []
    with torch.no_grad():
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = Float8Linear.from_linear(linear, use_fast_accum=use_fast_accum, rowwise=rowwise)
            setattr(parent, child, layer)
            replaced.append(name)
    return replaced
