"""The SDPA kernel order (speedups.attention): the rule for every platform, checked on the CPU, and that on the CPU
the chosen kernels run both models' attention (the autoencoder's 512-wide head included) without the math path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import rounding_bound
from torch.nn.attention import SDPBackend, sdpa_kernel

from klein_agent.pipeline import load_pipeline
from klein_agent.speedups.attention import AttentionPlan, Platform, attention_order

CUDNN, FLASH, EFFICIENT, MATH = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
HOPPER = Platform("cuda", (9, 0), cudnn_attention=True, flash_attention=True)


@pytest.mark.parametrize(
    ("platform", "head_dim", "expected"),
    [
        (HOPPER, 128, [CUDNN, FLASH, EFFICIENT, MATH]),  # the transformer on an H100/H200
        (HOPPER, 512, [EFFICIENT, MATH]),  # the autoencoder: flash and cuDNN stop at 256
        (Platform("cuda", (8, 0), cudnn_attention=True, flash_attention=True), 128, [FLASH, EFFICIENT, MATH]),
        (
            Platform("cuda", (8, 9), cudnn_attention=False, flash_attention=True),
            128,
            [FLASH, EFFICIENT, MATH],
        ),
        (
            Platform("cuda", (7, 5), cudnn_attention=True, flash_attention=True),
            128,
            [EFFICIENT, MATH],
        ),  # Turing
        (
            Platform("cuda", (9, 0), cudnn_attention=True, flash_attention=False),
            256,
            [CUDNN, EFFICIENT, MATH],
        ),
        (Platform("cuda", (9, 0)), 100, [MATH]),  # a head dim no fused kernel takes
        (Platform("cpu"), 128, [FLASH, MATH]),  # the CPU's fused kernel
        (Platform("cpu"), 512, [FLASH, MATH]),
        (Platform("mps"), 512, [FLASH, MATH]),
    ],
)
def test_order_per_platform_and_head_dim(
    platform: Platform, head_dim: int, expected: list[SDPBackend]
) -> None:
    assert attention_order(platform, head_dim) == expected


def test_fa3_is_reported_only_where_its_package_imports() -> None:
    # this machine has no CUDA device: the facts come from the device, and FA3 never shows up
    assert Platform.of(torch.device("cpu")) == Platform("cpu")
    plan = AttentionPlan.for_device(torch.device("cpu"), 128, 512)
    assert plan.transformer_order == plan.autoencoder_order == (FLASH, MATH) and not plan.fa3_available


def test_the_cpu_runs_both_models_on_the_fused_kernel() -> None:
    pipe = load_pipeline("tiny", device="cpu")
    assert pipe.attention.autoencoder_order == (FLASH, MATH)
    # the real autoencoder's one head of 512 channels; separate keys, so the softmax is not a near one-hot on the
    # diagonal (q with itself would make the output insensitive to the scale and to the summation order)
    q, k, v = torch.randn(3, 1, 1, 64, 512, generator=torch.Generator().manual_seed(0))
    with pipe.attention.autoencoder(), torch.profiler.profile() as prof:
        out = F.scaled_dot_product_attention(q, k, v)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names
    # The fused kernel sums in its own blocked order: within float32 rounding of the float64 math path, measured
    # by the float32 math path on this CPU (tests/tolerances.py)
    with sdpa_kernel(MATH):
        bound = rounding_bound(
            "fused attention",
            F.scaled_dot_product_attention(q.double(), k.double(), v.double()),
            F.scaled_dot_product_attention(q, k, v),
        )
    bound.check(out)
    with pipe.attention.autoencoder():  # a softmax scale off by 1e-3 relative must fail the same check
        wrong_scale = F.scaled_dot_product_attention(q, k, v, scale=(1 + 1e-3) / 512**0.5)
    bound.check_catches(wrong_scale, "softmax scale x (1 + 1e-3)")


def test_only_math_left_still_runs() -> None:
    """A plan whose fused kernels are all unusable falls back, never errors (MATH is always last)."""
    plan = AttentionPlan((MATH,), (MATH,))
    q = torch.randn(1, 2, 16, 8)
    with plan.transformer(), torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, q, q)
    assert "aten::_scaled_dot_product_attention_math" in {e.name for e in prof.events()}
