"""The speed-ups on the FLUX 3 [klein] transformer (issue 21, point 6), on the CPU: regional compilation of its mode
and joint blocks with shape buckets (Dynamo's "eager" and "aot_eager" backends; Inductor is too slow on two cores),
the SDPA kernel order, FP8 block linears (the reference path; its numerics are tests/test_fp8.py's), and `--compile`
and `--fp8` through `load_pipeline`.

Compiled equals uncompiled within float32 rounding, measured against a float64 run of the uncompiled model
(tests/tolerances.py); inside one bucket a new size or prompt length compiles nothing (Dynamo's own frame counter),
while a size in another bucket does (so the count can move). CUDA graphs of the steps (`Flux3StepGraphs`) are
selected only on CUDA; here their loop logic runs with a fake capture (tests/test_cuda_graphs.py's), which
recomputes into the same output tensor as a replay rewrites it, so a stale buffer or a missing clone would show.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
import torch._dynamo.config
from test_cuda_graphs import FakeCapture
from test_fp8 import fp8_relative_error
from tolerances import rounding_bound
from torch import Tensor
from torch._dynamo.testing import CompileCounter
from torch.nn.attention import SDPBackend

from klein_agent.loading.random_init import build_random_flux3
from klein_agent.model import flux3_sampling
from klein_agent.model.configs import preset
from klein_agent.model.flux3_transformer import Flux3Transformer, JointBlock, ModeBlock
from klein_agent.pipeline import load_pipeline
from klein_agent.pipeline.flux3 import Flux3Pipeline
from klein_agent.rules.requests import GenerationRequest
from klein_agent.speedups.compilation import compile_transformer_
from klein_agent.speedups.cuda_graphs import Flux3StepGraphs
from klein_agent.speedups.fp8 import FP8_DTYPE, Float8Linear, quantize_transformer_

pytestmark = pytest.mark.slow  # Dynamo traces both block kinds at several sizes

RANGES = [(16, 64), (65, 256)]  # two small buckets: image tokens (output plus references) per step


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Compiled variants hang off the blocks' shared code objects: start and leave every test with none."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(cache_size_limit=8, accumulated_cache_size_limit=256):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny() -> Flux3Transformer:
    return build_random_flux3(preset("flux3-tiny"))[0].eval()


def forward(
    model: Flux3Transformer, grid: tuple[int, int], refs: list[tuple[int, int]], text: int = 80
) -> Tensor:
    """The model on seeded float32 inputs (cast to the model's dtype): an output grid, reference grids, text."""
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(grid[0] * 100 + grid[1] + 7 * len(refs) + text)
    c = model.config
    img = torch.randn(1, grid[0] * grid[1], c.in_channels, generator=g).to(dtype)
    txt = torch.randn(1, text, c.context_in_dim, generator=g).to(dtype)
    ref = ref_ids = None
    if refs:
        ref = torch.randn(1, sum(h * w for h, w in refs), c.cond_in_channels, generator=g).to(dtype)
        ref_ids = flux3_sampling.reference_ids(refs)
    t = torch.tensor([0.7], dtype=dtype)
    target = torch.tensor([0.3], dtype=dtype) if c.flow_map else None
    ids, text_ids = flux3_sampling.image_ids(*grid), flux3_sampling.text_ids(text)
    with torch.inference_mode():
        return model(img, ids, txt, text_ids, t, target, ref, ref_ids)


def test_every_mode_and_joint_block_is_compiled(tiny: Flux3Transformer) -> None:
    model = copy.deepcopy(tiny)
    compile_transformer_(model, backend="eager", token_ranges=RANGES)
    blocks = [m for m in model.modules() if isinstance(m, ModeBlock | JointBlock)]
    assert len(blocks) == 3 * model.config.depth + model.config.depth_single_blocks
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_equals_eager_within_float32_rounding(tiny: Flux3Transformer, backend: str) -> None:
    model = copy.deepcopy(tiny)
    compile_transformer_(model, backend=backend, token_ranges=RANGES)
    exact = copy.deepcopy(tiny).double()
    for grid, refs in [((4, 5), []), ((3, 4), [(2, 3), (4, 2)])]:
        bound = rounding_bound(
            f"{backend} {grid} + {refs}", forward(exact, grid, refs), forward(tiny, grid, refs)
        )
        got = forward(model, grid, refs)
        if backend == "eager":  # Dynamo's graph run op by op: the same kernels, the same bits
            assert torch.equal(got, forward(tiny, grid, refs))
        bound.check(got)


def test_no_recompilation_inside_a_bucket(tiny: Flux3Transformer) -> None:
    counter = CompileCounter()
    model = copy.deepcopy(tiny)
    compile_transformer_(model, backend=counter, token_ranges=RANGES)
    forward(model, (4, 5), [])  # bucket 1: 20 image tokens, one text window
    first = counter.frame_count
    # mode blocks: the image in bucket 1 and the 80-token text window in bucket 2, each a graph; joint blocks: one
    assert first == 3
    # other sizes and prompt lengths, same bucket
    for grid, text in [((5, 6), 80), ((6, 8), 160), ((7, 9), 80)]:
        forward(model, grid, [], text)
    assert counter.frame_count == first
    # references (16 tokens, the smallest a reference has): the joint blocks' three-part graph; the references'
    # mode blocks reuse bucket 1's graph
    forward(model, (3, 6), [(4, 4)])
    with_refs = counter.frame_count
    assert with_refs == first + 1
    # 16 + 38 tokens: same bucket, other sizes, more references, a longer prompt
    forward(model, (4, 4), [(4, 5), (3, 6)], 160)
    assert counter.frame_count == with_refs
    forward(model, (10, 12), [])  # 120 tokens: the second bucket compiles its own joint graph
    assert counter.frame_count > with_refs
    forward(model, (4, 5), [], text=12)  # a text window outside the range: a static graph, not an error


def test_the_cpu_pipeline_runs_the_transformer_on_the_fused_kernel() -> None:
    pipe = load_pipeline("flux3-tiny", device="cpu")
    assert isinstance(pipe, Flux3Pipeline)
    fused = (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    assert pipe.attention.transformer_order == pipe.attention.autoencoder_order == fused
    request = GenerationRequest("x", width=64, height=64, seed=1, steps=1)
    with torch.profiler.profile() as prof:
        pipe.generate(request)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names


def test_load_pipeline_compile_gives_the_uncompiled_pictures_and_no_cuda_graphs_on_the_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    compiled = load_pipeline("flux3-tiny", compile=True, compile_backend="eager", warm_buckets="1")
    assert isinstance(compiled, Flux3Pipeline)
    assert compiled.step_graphs is None  # the CPU: the eager step loop; CUDA graphs only on CUDA
    assert "compile warm-up done" in caplog.text
    blocks = [m for m in compiled.transformer.modules() if isinstance(m, ModeBlock | JointBlock)]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    plain = load_pipeline("flux3-tiny")
    request = GenerationRequest("a red cube", width=80, height=64, seed=3, steps=2)
    got, want = compiled.generate(request).images[0], plain.generate(request).images[0]
    assert got.tobytes() == want.tobytes()  # "eager" runs Dynamo's graph op by op: the same bits


def test_step_graphs_one_capture_per_shape_the_plain_loops_pictures_and_lora_keys() -> None:
    pipe = load_pipeline("flux3-tiny", device="cpu")
    assert isinstance(pipe, Flux3Pipeline) and pipe.step_graphs is None
    requests = [
        GenerationRequest("graphs", width=64, height=48, seed=5, steps=3),
        GenerationRequest("other prompt", width=64, height=48, seed=6, steps=3),  # same shape: replays only
    ]
    want = [pipe.generate(r).images[0].tobytes() for r in requests]
    fake = FakeCapture()
    pipe.step_graphs = Flux3StepGraphs(pipe.transformer, capture=fake)  # what load_pipeline sets on CUDA
    progress: list[int] = []
    got = pipe.generate(requests[0], progress=lambda d, t, m: progress.append(d)).images[0].tobytes()
    assert got == want[0] and progress == [1, 2, 3, 4, 5]
    assert pipe.generate(requests[1]).images[0].tobytes() == want[1]
    assert pipe.step_graphs.captures == 1 and pipe.step_graphs.replays == fake.replayed == 6
    pipe.generate(GenerationRequest("graphs", width=80, height=48, seed=5, steps=1))  # another shape
    assert pipe.step_graphs.captures == 2
    pipe.step_graphs.context_key = ("x", 1.0)  # another set of adapters: the pipeline sets the key per call
    pipe.generate(requests[0])
    assert pipe.step_graphs.context_key == () and pipe.step_graphs.captures == 2  # reset to the call's (none)


def test_fp8_replaces_the_mode_and_joint_block_linears_only(tiny: Flux3Transformer) -> None:
    model = copy.deepcopy(tiny)
    expected = [
        f"{name}.{child}"
        for name, block in model.named_modules()
        if isinstance(block, ModeBlock | JointBlock)
        for child, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    blocks = 3 * tiny.config.depth + tiny.config.depth_single_blocks
    assert len(expected) == 6 * blocks  # q, k, v, out, MLP in and out in every block
    assert sorted(quantize_transformer_(model)) == sorted(expected)
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in expected)
    for name in ("txt_in", "emb_in.image", "time_in.in_layer", "single_stream_modulations.txt.lin"):
        assert type(model.get_submodule(name)) is torch.nn.Linear  # embedders, modulations: full precision
    assert model.state_dict()["txt_mode_blocks.0.q_proj.weight"].dtype == FP8_DTYPE
    err = fp8_relative_error(forward(tiny, (4, 5), [(4, 4)]), forward(model, (4, 5), [(4, 4)]))
    print(f"FP8 relative L2 error, flux3-tiny: {err:.5f}")
    assert 1e-4 < err < 0.1, err  # the bounds tests/test_fp8.py holds FLUX.2 to


def test_load_pipeline_fp8_quantizes_and_still_draws() -> None:
    pipe = load_pipeline("flux3-tiny", fp8=True)
    assert isinstance(pipe, Flux3Pipeline)
    assert any(isinstance(m, Float8Linear) for m in pipe.transformer.modules())
    request = GenerationRequest("a red cube", width=64, height=64, seed=3, steps=2)
    made = pipe.generate(request).images[0]
    plain = load_pipeline("flux3-tiny").generate(request).images[0]
    assert made.size == plain.size and made.tobytes() != plain.tobytes()
