"""FP8 linears: quantization numerics, the _scaled_mm call's layout, the transformer conversion, scaled-FP8 files.

Everything runs on the CPU through the reference path, which computes what the GPU kernel computes; the kernel's
argument layout is checked by routing the CPU through the GPU branch into PyTorch's own CPU _scaled_mm.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from klein_agent.loading.random_init import init_random_
from klein_agent.model import sampling
from klein_agent.model.configs import TransformerConfig, preset
from klein_agent.model.transformer import Flux2Transformer
from klein_agent.speedups import fp8
from klein_agent.speedups.fp8 import (
    FP8_DTYPE,
    Float8Linear,
    quantize_e4m3,
    quantize_transformer_,
    scaled_mm_available,
)

MID = preset("mid").transformer  # the registry's benchmark shape: deeper and wider than tiny
CONFIGS = {"tiny": preset("tiny").transformer, "mid": MID}


def random_transformer(config: TransformerConfig, dtype: torch.dtype = torch.float32) -> Flux2Transformer:
    model = Flux2Transformer(config)
    init_random_(model, torch.Generator().manual_seed(0))
    return model.to(dtype).eval()


def forward_inputs(config: TransformerConfig, dtype: torch.dtype = torch.float32) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(1)
    h, w, txt = 4, 6, 12
    img = torch.randn(2, h * w, config.in_channels, generator=g).to(dtype)
    ctx = torch.randn(2, txt, config.context_in_dim, generator=g).to(dtype)
    return img, sampling.image_ids(h, w), ctx, sampling.text_ids(txt), torch.tensor([0.9, 0.3])


def block_linear_names(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))
    ]


def cpu_scaled_mm_works() -> bool:
    a = torch.zeros(16, 16, dtype=FP8_DTYPE)
    one = torch.ones((), dtype=torch.float32)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def summation_bound(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """How far two float32 computations of `(x_q @ w_q.T) * x_scale * w_scale` may differ when they sum in
    different orders (another CPU's SIMD width, blocking, AMX tiles): [M, N]. Each is within (K + 2) * u * S of
    the exact value, where S = sum_k |x_q w_q| * |x_scale * w_scale| (u = eps/2; K - 1 additions, the scale
    multiplications, products of e4m3 values are exact in float32), so they differ by at most (K + 2) * eps * S.
    Computed in float64 from the test's own tensors; a wrong scale or a wrong product is far outside it."""
    k = x_q.shape[-1]
    magnitude = x_q.double().abs() @ w_q.double().abs().t() * (x_scale.double() * w_scale.double()).abs()
    return (k + 2) * torch.finfo(torch.float32).eps * magnitude


def assert_within(got: Tensor, want: Tensor, bound: Tensor) -> None:
    """Every |got - want| <= bound, with the worst element in the message."""
    excess = (got.double() - want.double()).abs() - bound
    worst = int(excess.argmax())
    assert (excess <= 0).all(), (
        f"element {worst}: |{got.flatten()[worst].item()} - {want.flatten()[worst].item()}| exceeds the bound "
        f"{bound.flatten()[worst].item():.3g} by {excess.flatten()[worst].item():.3g}"
    )


def fp8_relative_error(reference: Tensor, quantized: Tensor) -> float:
    """||quantized - reference|| / ||reference|| over the whole tensor, in float64."""
    ref = reference.double()
    return float((quantized.double() - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------------------------
# Quantization of one tensor and one layer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_e4m3_scale_and_rounding(dtype: torch.dtype) -> None:
    t = (torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    q, scale = quantize_e4m3(t)
    assert q.dtype == FP8_DTYPE and q.shape == t.shape
    assert scale.dtype == torch.float32 and scale.ndim == 0
    assert scale == t.float().abs().amax() / 448
    assert q.float().abs().max() == 448  # the largest magnitude lands on e4m3's largest finite value
    # round-to-nearest with 3 mantissa bits: relative error at most 2^-4, plus half the smallest subnormal (2^-9)
    err = (q.float() * scale - t.float()).abs()
    assert torch.all(err <= t.float().abs() * 2**-4 + scale * 2**-10)
    assert err.max() > 0  # it really rounded


def test_quantize_e4m3_zero_and_wide_range_stay_finite() -> None:
    q, scale = quantize_e4m3(torch.zeros(4, 4))
    assert torch.all(q.float() == 0) and torch.isfinite(scale)
    wide = torch.tensor([1e-30, -3.0, 1e30, 7.0])
    q, scale = quantize_e4m3(wide)
    assert torch.isfinite(q.float()).all()  # e4m3fn overflows to NaN, so the clamp must hold
    assert q.float()[2] == 448


def make_linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    lin = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0.0, in_features**-0.5, generator=torch.Generator().manual_seed(seed))
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_linear_reference_path(dtype: torch.dtype) -> None:
    lin = make_linear(64, 48).to(dtype)
    layer = Float8Linear.from_linear(lin)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.shape == (48, 64)
    assert layer.weight_scale.dtype == torch.float32
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert not layer.uses_scaled_mm  # CPU: the reference path
    with torch.no_grad():
        got, want = layer(x), lin(x)
    assert got.dtype == dtype and got.shape == (3, 5, 48)

    # The reference path is exactly: quantize x per tensor, integer-like product in float32, both scales after.
    x_q, x_scale = quantize_e4m3(x.reshape(-1, 64))
    manual = (x_q.float() @ layer.weight.float().t()) * (x_scale * layer.weight_scale)
    torch.testing.assert_close(got, manual.reshape(3, 5, 48).to(dtype), rtol=0, atol=0)

    err = fp8_relative_error(want.float(), got.float())
    assert 1e-3 < err < 0.1, err  # a few percent per layer: quantized, not broken


@pytest.mark.skipif(not cpu_scaled_mm_works(), reason="this PyTorch build has no CPU _scaled_mm")
def test_reference_path_matches_pytorch_scaled_mm() -> None:
    """An independent implementation of the kernel (PyTorch's CPU _scaled_mm) agrees with the reference path,
    which pins down the scale convention: scales are dequantization multipliers applied after accumulation."""
    layer = Float8Linear.from_linear(make_linear(64, 32))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    x_q, x_scale = quantize_e4m3(x)
    kernel = torch._scaled_mm(
        x_q, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale, out_dtype=torch.float32
    )
    with torch.no_grad():
        assert_within(layer(x), kernel, summation_bound(x_q, layer.weight, x_scale, layer.weight_scale))


@pytest.mark.skipif(not cpu_scaled_mm_works(), reason="this PyTorch build has no CPU _scaled_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_branch_calls_scaled_mm_with_its_layout(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Pretend the CPU is an FP8 GPU: forward must call _scaled_mm with a row-major activation, a column-major
    weight (dims multiples of 16), float32 scalar scales and the input's dtype out, and agree with the reference."""
    calls: list[dict[str, Any]] = []
    real = torch._scaled_mm

    def spy(a: Tensor, b: Tensor, **kwargs: Any) -> Tensor:
        calls.append({"a": a, "b": b, **kwargs})
        return real(a, b, **kwargs)

    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    layer = Float8Linear.from_linear(make_linear(64, 96).to(dtype))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert layer.uses_scaled_mm
    with torch.no_grad():
        got = layer(x)
        layer.force_reference = True
        assert not layer.uses_scaled_mm
        want = layer(x)
    assert len(calls) == 1
    call = calls[0]
    a, b = call["a"], call["b"]
    assert a.shape == (10, 64) and a.stride() == (64, 1)  # row-major [M, K]
    assert b.shape == (64, 96) and b.stride() == (1, 64)  # column-major [K, N], a view of the [N, K] buffer
    assert b.data_ptr() == layer.weight.data_ptr()  # no copy of the weight per call
    for scale in (call["scale_a"], call["scale_b"]):
        assert scale.dtype == torch.float32 and scale.numel() == 1
    assert call["out_dtype"] == dtype and call["use_fast_accum"] is False
    assert got.dtype == dtype and got.shape == (2, 5, 96)
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_unaligned_shapes_use_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: True)
    layer = Float8Linear.from_linear(make_linear(24, 40))  # neither dim a multiple of 16
    x = torch.randn(3, 24)
    assert not layer.aligned and not layer.uses_scaled_mm
    with torch.no_grad():
        assert layer(x).shape == (3, 40)


def test_path_choice_follows_device_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel check runs when the weight lands on a device (construction, .to()), not per forward."""
    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: torch.device(device).type == "meta")
    layer = Float8Linear.from_linear(make_linear(32, 16))
    assert not layer.uses_scaled_mm
    layer.to("meta")
    assert layer.weight.is_meta and layer.uses_scaled_mm
    layer.to_empty(device="cpu")  # meta tensors have no data to copy back
    assert not layer.uses_scaled_mm


def test_scaled_mm_available_is_false_off_cuda() -> None:
    assert scaled_mm_available("cpu") is False
    assert scaled_mm_available(torch.device("meta")) is False


def test_an_fp8_weight_wraps_without_requantizing() -> None:
    layer = Float8Linear.from_linear(make_linear(32, 16))
    again = Float8Linear(layer.weight.clone(), layer.weight_scale.clone())
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), again(x))
    with pytest.raises(ValueError, match="float8"):
        Float8Linear(torch.randn(16, 32), torch.tensor(1.0))
    with pytest.raises(ValueError, match="per-tensor"):
        Float8Linear(layer.weight, torch.ones(16))
    with pytest.raises(ValueError, match="bias"):
        Float8Linear.from_linear(nn.Linear(32, 16))


def test_dtype_casts_keep_fp8_storage() -> None:
    layer = Float8Linear.from_linear(make_linear(32, 16))
    weight, scale = layer.weight.clone(), layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.weight.dtype == FP8_DTYPE and torch.equal(layer.weight.float(), weight.float())
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and scaled_mm_available("cuda")),
    reason="needs a CUDA GPU with FP8 (sm 8.9+)",
)
def test_gpu_kernel_matches_reference() -> None:
    layer = Float8Linear.from_linear(make_linear(256, 512)).cuda()
    x = torch.randn(4, 77, 256, device="cuda").to(torch.bfloat16)
    assert layer.uses_scaled_mm
    with torch.no_grad():
        got = layer(x)
        layer.force_reference = True
        want = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", CONFIGS)
def test_quantize_transformer_replaces_block_linears_only(size: str) -> None:
    config = CONFIGS[size]
    original = random_transformer(config)
    model = copy.deepcopy(original)
    expected = block_linear_names(original)
    assert len(expected) == 8 * config.depth + 2 * config.depth_single_blocks

    replaced = quantize_transformer_(model)

    assert replaced == expected
    assert all(isinstance(model.get_submodule(name), Float8Linear) for name in replaced)
    assert not any(isinstance(m, nn.Linear) for name, m in model.named_modules() if name in expected)
    for name in (
        "img_in",
        "txt_in",
        "time_in.in_layer",
        "double_stream_modulation_img.lin",
        "final_layer.linear",
    ):
        assert (
            type(model.get_submodule(name)) is nn.Linear
        )  # embedders, modulations, final layer: full precision
    sd = model.state_dict()
    assert sd["single_blocks.0.linear1.weight"].dtype == FP8_DTYPE
    assert sd["single_blocks.0.linear1.weight_scale"].dtype == torch.float32
    assert quantize_transformer_(model) == []  # idempotent


@pytest.mark.parametrize(
    "size", [pytest.param(k, marks=[pytest.mark.slow] if k == "mid" else []) for k in CONFIGS]
)
def test_fp8_transformer_error_is_small_but_nonzero(size: str) -> None:
    config = CONFIGS[size]
    original = random_transformer(config)
    model = copy.deepcopy(original)
    quantize_transformer_(model)
    inputs = forward_inputs(config)
    with torch.no_grad():
        want, got = original(*inputs), model(*inputs)
    err = fp8_relative_error(want, got)
    print(f"FP8 relative L2 error, {size}: {err:.5f}")
    assert 1e-4 < err < 0.1, err


@pytest.mark.slow
def test_fp8_transformer_in_bf16() -> None:
    """Quantizing a model that is already bf16 (as on a GPU) stays close to the float32 original."""
    original = random_transformer(MID)
    model = random_transformer(MID, torch.bfloat16)
    quantize_transformer_(model)
    with torch.no_grad():
        want = original(*forward_inputs(MID))
        got = model(*forward_inputs(MID, torch.bfloat16))
    assert got.dtype == torch.bfloat16
    err = fp8_relative_error(want, got.float())
    assert 1e-4 < err < 0.1, err


def test_include_narrows_the_selection() -> None:
    model = random_transformer(CONFIGS["tiny"])
    asked: list[str] = []

    def only_single(name: str, linear: nn.Linear) -> bool:
        asked.append(name)
        return name.startswith("single_blocks.")

    replaced = quantize_transformer_(model, include=only_single)
    assert asked == block_linear_names(random_transformer(CONFIGS["tiny"]))  # asked only about block linears
    assert replaced == [name for name in asked if name.startswith("single_blocks.")]
    assert type(model.get_submodule("double_blocks.0.img_attn.qkv")) is nn.Linear


def test_quantized_model_survives_a_dtype_cast() -> None:
    model = random_transformer(CONFIGS["tiny"])
    quantize_transformer_(model)
    model.to(torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16
    assert model.get_submodule("single_blocks.0.linear2").weight.dtype == FP8_DTYPE
    with torch.no_grad():
        out = model(*forward_inputs(CONFIGS["tiny"], torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
