"""FP8 with rowwise scales and fast accumulation, only with --compile: the scale computation and the dequantised
error against float (on the CPU, where the FP8 kernel's own rounding is not available), the layer against PyTorch's
CPU _scaled_mm with rowwise scales, the call the GPU branch makes, and the rule tying the recipe to --compile."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import Tensor

from klein_agent.pipeline import load_pipeline
from klein_agent.speedups import fp8
from klein_agent.speedups.fp8 import (
    EXACT_RECIPE,
    FAST_RECIPE,
    FP8_MAX,
    FP8_WITHOUT_COMPILE,
    Float8Linear,
    quantize_e4m3,
    quantize_e4m3_rowwise,
    recipe_for,
)
from tests.test_fp8 import (
    assert_within,
    cpu_scaled_mm_works,
    fp8_relative_error,
    make_linear,
    summation_bound,
)

E4M3_RELATIVE_STEP = 2.0**-3  # 3 mantissa bits: neighbours differ by 1/8 of the value's power of two
E4M3_SMALLEST_STEP = 2.0**-9  # the subnormal spacing


def rows_of_different_magnitudes() -> Tensor:
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.tensor([1e-3, 1e-1, 1.0, 30.0, 400.0])[:, None]  # activations' tokens differ this much
    return torch.randn(5, 64, generator=g) * magnitudes


def test_rowwise_scales_map_each_rows_largest_value_onto_448() -> None:
    t = rows_of_different_magnitudes()
    q, scale = quantize_e4m3_rowwise(t)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (5, 1)
    torch.testing.assert_close(scale, t.abs().amax(dim=1, keepdim=True) / FP8_MAX, rtol=0, atol=0)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((5,), FP8_MAX))
    # every element within half a step of e4m3's grid at its own magnitude (round to nearest)
    dequantized = q.float() * scale
    bound = 0.5 * (E4M3_RELATIVE_STEP * t.abs() + E4M3_SMALLEST_STEP * scale)
    assert ((dequantized - t).abs() <= bound * (1 + 1e-6)).all()


def test_rowwise_keeps_small_rows_that_per_tensor_scaling_flattens() -> None:
    t = rows_of_different_magnitudes()
    q_row, s_row = quantize_e4m3_rowwise(t)
    q_all, s_all = quantize_e4m3(t)
    row_err = [fp8_relative_error(t[i], (q_row.float() * s_row)[i]) for i in range(5)]
    all_err = [fp8_relative_error(t[i], (q_all.float() * s_all)[i]) for i in range(5)]
    assert max(row_err) < 0.04  # every row keeps e4m3's ~2-3 % relative error
    # the 1e-3 row under a scale set by the 400 row: mostly zeros and subnormals
    assert all_err[0] > 0.5 > 10 * row_err[0]
    assert row_err[-1] == pytest.approx(all_err[-1])  # the largest row sets both scales alike


def test_rowwise_quantization_refuses_other_ranks_and_keeps_zeros() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize_e4m3_rowwise(torch.zeros(2, 3, 4))
    q, scale = quantize_e4m3_rowwise(torch.zeros(3, 16))
    assert torch.equal(q.float(), torch.zeros(3, 16)) and torch.isfinite(scale).all()


def test_rowwise_layer_against_float_and_against_pytorchs_kernel() -> None:
    linear = make_linear(64, 48)
    layer = Float8Linear.from_linear(linear, rowwise=True)
    assert layer.weight_scale.shape == (48, 1) and "rowwise" in repr(layer)
    x = rows_of_different_magnitudes()
    with torch.no_grad():
        got = layer(x)
        want = linear(x)
    for i in range(5):  # each token's output within FP8's error of the float product, small tokens included
        assert fp8_relative_error(want[i], got[i]) < 0.06
    if cpu_scaled_mm_works():
        x_q, x_scale = quantize_e4m3_rowwise(x)
        kernel = torch._scaled_mm(
            x_q, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale.t(), out_dtype=torch.float32
        )
        w_scale = layer.weight_scale.t()
        bound = summation_bound(x_q, layer.weight, x_scale, w_scale)  # from the arithmetic, not from one CPU
        assert_within(got, kernel, bound)
        # and the bound is tight enough to see one token's scale off by 1/1024
        off = x_scale.clone()
        off[3] *= 1 + 2**-10
        wrong = torch._scaled_mm(x_q, layer.weight.t(), scale_a=off, scale_b=w_scale, out_dtype=torch.float32)
        with pytest.raises(AssertionError, match="exceeds the bound"):
            assert_within(wrong, kernel, bound)


def test_rowwise_gpu_branch_passes_row_and_column_scales_and_fast_accum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not cpu_scaled_mm_works():
        pytest.skip("this PyTorch build has no CPU _scaled_mm")
    calls: list[dict[str, Any]] = []
    real = torch._scaled_mm

    def spy(a: Tensor, b: Tensor, **kwargs: Any) -> Tensor:
        calls.append(kwargs)
        return real(a, b, **{**kwargs, "use_fast_accum": False})  # the CPU kernel has no fast accumulation

    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    layer = Float8Linear.from_linear(make_linear(64, 96).bfloat16(), rowwise=True, use_fast_accum=True)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        got = layer(x)
        layer(x.float())  # rowwise FP8 products write bfloat16 only: float32 takes the reference path
    assert len(calls) == 1
    call = calls[0]
    assert call["scale_a"].shape == (10, 1) and call["scale_b"].shape == (1, 96)
    assert call["use_fast_accum"] is True and call["out_dtype"] == torch.bfloat16
    layer.force_reference = True
    with torch.no_grad():
        reference = layer(x)
    # both are float32 sums rounded once to bfloat16 (relative error <= 2**-8 each), so they differ by at most the
    # float32 summation bound plus those two roundings
    x_q, x_scale = quantize_e4m3_rowwise(x.reshape(-1, 64))
    bound = summation_bound(x_q, layer.weight, x_scale, layer.weight_scale.t()).reshape(got.shape)
    bf16_rounding = 2.0**-8 * (got.double().abs() + reference.double().abs())
    assert_within(got, reference, bound * (1 + 2.0**-8) + bf16_rounding)


def test_the_fast_recipe_only_with_compile(caplog: pytest.LogCaptureFixture) -> None:
    assert recipe_for(True) == FAST_RECIPE and FAST_RECIPE.rowwise and FAST_RECIPE.use_fast_accum
    assert recipe_for(False) == EXACT_RECIPE and not EXACT_RECIPE.rowwise and not EXACT_RECIPE.use_fast_accum
    caplog.set_level(logging.WARNING, logger="klein_agent.pipeline.build")
    eager = load_pipeline("tiny", device="cpu", fp8=True)
    assert FP8_WITHOUT_COMPILE in caplog.text
    layers = [m for m in eager.transformer.modules() if isinstance(m, Float8Linear)]
    assert layers and all(not m.rowwise and not m.use_fast_accum for m in layers)
    caplog.clear()
    torch._dynamo.reset()
    compiled = load_pipeline("tiny", device="cpu", fp8=True, compile=True, compile_backend="eager")
    assert FP8_WITHOUT_COMPILE not in caplog.text
    layers = [m for m in compiled.transformer.modules() if isinstance(m, Float8Linear)]
    assert layers and all(m.rowwise and m.use_fast_accum for m in layers)
    torch._dynamo.reset()
