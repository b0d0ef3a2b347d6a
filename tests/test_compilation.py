"""Regional compilation on the CPU with Dynamo's "eager" and "aot_eager" backends (Inductor is too slow on two
cores): same outputs as uncompiled at two sizes, every block wrapped, one graph per block kind and shape.

"Same" is exact where the same module runs the same kernels ("eager" hands Dynamo's graph back to PyTorch op by
op); through AOTAutograd, whose tracing may decompose and re-lay-out ops, it is within float32 rounding, measured
against a float64 run of the uncompiled model (tests/tolerances.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.config
from tolerances import RoundingBound, rounding_bound, scaled_weight
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from klein_agent.loading.random_init import build_tiny
from klein_agent.model import sampling
from klein_agent.model.transformer import DoubleStreamBlock, Flux2Transformer, SingleStreamBlock
from klein_agent.speedups.compilation import RECOMPILE_LIMIT, compile_transformer_
from klein_agent.speedups.fp8 import quantize_transformer_

pytestmark = pytest.mark.slow  # Dynamo traces every block kind at several sizes: ~40 s in all on two cores

SIZES = [(2, 3), (4, 5)]  # latent grids (h, w): two shapes, so the second one must recompile
BLOCK_WEIGHT = (
    "double_blocks.0.img_mlp.2.weight"  # the self-checks' perturbed weight: no normalization follows it
)


def compiled_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks whose calls go through torch.compile."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (DoubleStreamBlock, SingleStreamBlock))
        and getattr(module, "_compiled_call_impl", None) is not None
    ]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Compiled variants hang off the blocks' shared code objects; start and leave every test with none, and
    restore the process-wide limits compile_transformer_ raises."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(cache_size_limit=8, accumulated_cache_size_limit=256):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny() -> Flux2Transformer:
    return build_tiny()[0]


def forward(
    model: Flux2Transformer, h: int, w: int, txt: int = 7, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The model on seeded inputs of an (h, w) grid, drawn in float32 and cast to `dtype` (the model's)."""
    g = torch.Generator().manual_seed(h * 100 + w)
    config = model.config
    img = torch.randn(2, h * w, config.in_channels, generator=g).to(dtype)
    ctx = torch.randn(2, txt, config.context_in_dim, generator=g).to(dtype)
    t = torch.tensor([0.8, 0.4], dtype=dtype)
    with torch.inference_mode():  # as in sampling.denoise
        return model(img, sampling.image_ids(h, w), ctx, sampling.text_ids(txt), t)


def rounding_of(tiny: Flux2Transformer, h: int, w: int) -> RoundingBound:
    """The uncompiled model's float64 output and its float32 error on this CPU, at the (h, w) grid."""
    exact = forward(copy.deepcopy(tiny).double(), h, w, dtype=torch.float64)
    return rounding_bound(f"compiled {h}x{w}", exact, forward(tiny, h, w))


def all_block_names(model: Flux2Transformer) -> list[str]:
    return [f"double_blocks.{i}" for i in range(len(model.double_blocks))] + [
        f"single_blocks.{i}" for i in range(len(model.single_blocks))
    ]


def test_eager_backend_same_output_one_graph_per_block_kind_and_shape(tiny: Flux2Transformer) -> None:
    model = copy.deepcopy(tiny)
    counter = CompileCounter()  # Dynamo's "eager" backend that also counts the graphs it is handed
    compile_transformer_(model, backend=counter, fullgraph=True)  # fullgraph: no graph break in any block

    assert compiled_blocks(model) == all_block_names(model)
    assert compiled_blocks(tiny) == []
    assert model.state_dict().keys() == tiny.state_dict().keys()  # wrapping in place keeps checkpoint keys
    for i, (h, w) in enumerate(SIZES, start=1):
        for _ in range(2):  # the repeat must hit the cache
            assert torch.equal(forward(model, h, w), forward(tiny, h, w))
        # two block kinds per shape, however many blocks of each kind: the blocks share their graphs
        assert counter.frame_count == 2 * i


def test_aot_eager_backend_same_output_at_two_sizes(tiny: Flux2Transformer) -> None:
    model = copy.deepcopy(tiny)
    compile_transformer_(model, backend="aot_eager", fullgraph=True)
    assert len(compiled_blocks(model)) == len(model.double_blocks) + len(model.single_blocks)
    for h, w in SIZES:
        bound = rounding_of(tiny, h, w)
        bound.check(forward(model, h, w))
    # In place, so the compiled graph reads it without recompiling. 1e-2, not 1e-3: the tiny model's blocks move its
    # output little (1e-3 gives only 1.4x the bound here), and the self-check must keep its margin on any CPU.
    with scaled_weight(model, BLOCK_WEIGHT, relative=1e-2):
        bound.check_catches(forward(model, h, w), f"{BLOCK_WEIGHT} x (1 + 1e-2)")


def test_compiled_denoise_matches(tiny: Flux2Transformer) -> None:
    """The sampling loop (inference mode, per-step timesteps, precomputed RoPE) through compiled blocks."""
    model = copy.deepcopy(tiny)
    compile_transformer_(model, backend="eager")
    h, w, txt = 3, 4, 6
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, h * w, tiny.config.in_channels, generator=g)
    ctx = torch.randn(1, txt, tiny.config.context_in_dim, generator=g)
    args = (noise, sampling.image_ids(h, w), ctx, sampling.text_ids(txt), sampling.sigmas(3, h * w))
    assert torch.equal(sampling.denoise(model, *args), sampling.denoise(tiny, *args))


def test_fp8_blocks_compile_without_graph_breaks(tiny: Flux2Transformer) -> None:
    quantized = copy.deepcopy(tiny)
    quantize_transformer_(quantized)
    model = copy.deepcopy(quantized)
    compile_transformer_(model, backend="aot_eager", fullgraph=True)
    for h, w in SIZES:
        # The FP8 layers have no float64 run (their products are float32 by design), so the bound is the unquantized
        # model's float32 rounding, around the uncompiled FP8 output: both FP8 runs quantize the same activations
        # and sum the same exact e4m3 products in float32.
        plain = rounding_of(tiny, h, w)
        bound = RoundingBound(
            f"fp8 compiled {h}x{w}", forward(quantized, h, w).double(), plain.rounding, plain.floor
        )
        bound.check(forward(model, h, w))
    with scaled_weight(model, f"{BLOCK_WEIGHT}_scale", relative=1e-2):  # an FP8 layer's scale, as above
        bound.check_catches(forward(model, h, w), f"{BLOCK_WEIGHT}_scale x (1 + 1e-2)")


def test_recompile_limit_is_raised_not_lowered(tiny: Flux2Transformer) -> None:
    compile_transformer_(copy.deepcopy(tiny), backend="eager")
    assert torch._dynamo.config.cache_size_limit == RECOMPILE_LIMIT > 8
    assert torch._dynamo.config.accumulated_cache_size_limit >= 2 * RECOMPILE_LIMIT  # both block kinds fit
    torch._dynamo.config.cache_size_limit = 1000
    compile_transformer_(copy.deepcopy(tiny), backend="eager")
    assert torch._dynamo.config.cache_size_limit == 1000


def test_shapes_beyond_a_lower_limit_stay_compiled(tiny: Flux2Transformer) -> None:
    """Past the limit Dynamo silently runs a block kind eagerly; with the limit at 2, the third shape would not be
    compiled unless compile_transformer_ raised it."""
    torch._dynamo.config.cache_size_limit = 2
    model = copy.deepcopy(tiny)
    counter = CompileCounter()
    compile_transformer_(model, backend=counter)
    shapes = 3
    for w in range(1, shapes + 1):
        forward(model, 1, w)
    assert counter.frame_count == 2 * shapes


def test_mode_goes_to_inductor_only(tiny: Flux2Transformer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor itself is not run here; what it would be asked for is."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    model = copy.deepcopy(tiny)
    blocks = len(model.double_blocks) + len(model.single_blocks)

    compile_transformer_(model)
    assert len(calls) == blocks
    assert calls[0] == {
        "backend": "inductor",
        "mode": "max-autotune-no-cudagraphs",
        "dynamic": False,
        "fullgraph": False,
    }
    calls.clear()
    compile_transformer_(model, backend="aot_eager", dynamic=True)
    assert calls == [{"backend": "aot_eager", "dynamic": True, "fullgraph": False}] * blocks
