"""What LoRA and LoKr files share once their keys are mapped: the dtypes a weight or alpha may have, reading a
weight as finite float32, and the bound on how much an update may change an output."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from klein_agent.loading.errors import LoRAError
from klein_agent.loading.safetensors_file import SafetensorsFile

WEIGHT_DTYPES = ("F32", "BF16", "F16", "F64")
ALPHA_DTYPES = (*WEIGHT_DTYPES, "I64", "I32", "I16", "I8", "U8")  # a real number; BOOL is not one
RESAVE = "save the adapter again with float32, bfloat16 or float16 weights"
BROKEN = "the adapter is broken: train or export it again"


def check_weight_dtype(st: SafetensorsFile, key: str) -> None:
    """Refuse a weight whose dtype is no float we read (float8 or integers), naming `key`."""
    dtype = st.entries[key].dtype
    if dtype not in WEIGHT_DTYPES:
        kind = "float8" if dtype.startswith("F8") else "not floating-point"
        raise LoRAError(st.path, f"its dtype {dtype} is {kind}", RESAVE, key)


def check_alpha_entry(st: SafetensorsFile, key: str) -> None:
    """Refuse an alpha tensor that is not one real number, from the header."""
    entry = st.entries[key]
    if entry.dtype not in ALPHA_DTYPES or math.prod(entry.shape) != 1:
        raise LoRAError(
            st.path,
            f"alpha is {entry.dtype} {list(entry.shape)}, not one number",
            "store alpha as a float32 scalar",
            key,
        )


def read_alpha(st: SafetensorsFile, key: str) -> float:
    """The alpha tensor `key` as a float; raises LoRAError unless it is a positive finite number."""
    alpha = float(st.read(key).double().item())
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(
            st.path,
            f"alpha must be a positive number, got {alpha}",
            "set it to the alpha the adapter was trained with (often its rank)",
            key,
        )
    return alpha


def finite(st: SafetensorsFile, key: str) -> Tensor:
    """The tensor `key` as float32; raises LoRAError if any value is NaN or infinite (after the conversion, so a
    float64 value beyond float32's range is refused too)."""
    value = st.read(key).float()
    if not bool(torch.isfinite(value).all()):
        raise LoRAError(st.path, "it holds NaN or infinite values (in float32)", BROKEN, key)
    return value


def check_row_norms(path: Path, key: str, largest_row: float, in_features: int, max_scale: float) -> None:
    """Refuse an update no trained adapter has, given the largest row norm of its delta W (`largest_row`). For an
    input x of unit RMS (‖x‖ = √in: activations after the model's norms), row i of the update changes output i by at
    most ‖delta W_i‖·√in (Cauchy-Schwarz, reached by some x); at the largest scale a call may choose, that must stay
    within float16's range (65504), the narrowest dtype the model runs in. Trained adapters are orders of magnitude
    below; 1e30 weights, an alpha of 1e38 or a rank-1 spike of 1e4 are far above."""
    worst = largest_row * math.sqrt(in_features) * max_scale
    limit = float(torch.finfo(torch.float16).max)
    if not worst <= limit:  # also catches inf and NaN from an overflowing product
        raise LoRAError(
            path,
            f"the update can change an output by {worst:.3g} for a unit input at scale {max_scale:g}, over "
            f"{limit:g} (float16's range): no trained adapter is that large",
            "check the file's weights and alpha; train or export it again",
            key,
        )
