"""The CUDA-graph step loop (speedups.cuda_graphs.StepGraphs) with a fake capture on the CPU: a "replay" runs the
model on the static buffers, so what is tested is the loop's logic: one capture per shape, inputs copied into the
buffers every call, outputs cloned (guidance's two passes share a graph), progress and cancellation between
replays, the LRU bound, the LoRA key, and the pictures equal to the plain loop's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from klein_agent.loading.random_init import build_tiny
from klein_agent.model import sampling
from klein_agent.model.transformer import Flux2Transformer
from klein_agent.pipeline import load_pipeline
from klein_agent.rules.requests import GenerationRequest
from klein_agent.speedups.cuda_graphs import StepGraphs


class FakeCapture:
    """Stands in for capture_cuda: records the static buffers; each replay recomputes into the same output tensor
    (as a graph rewrites its output in place), so stale buffers or a missing clone would show."""

    def __init__(self) -> None:
        self.replayed = 0

    def __call__(
        self, step: Callable[..., Tensor], args: Sequence[Tensor], kwargs: dict[str, Any]
    ) -> tuple[Callable[[], None], Tensor]:
        output = step(*args, **kwargs).clone()

        def replay() -> None:
            self.replayed += 1
            output.copy_(step(*args, **kwargs))

        return replay, output


@pytest.fixture(scope="module")
def tiny() -> Flux2Transformer:
    return build_tiny()[0]


def inputs(model: Flux2Transformer, h: int, w: int, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, h * w, model.config.in_channels, generator=g)
    ctx = torch.randn(1, 12, model.config.context_in_dim, generator=g)
    return noise, sampling.image_ids(h, w), ctx, sampling.text_ids(12), sampling.sigmas(4, h * w)


def test_one_capture_per_shape_and_the_plain_loops_latents(tiny: Flux2Transformer) -> None:
    fake = FakeCapture()
    graphs = StepGraphs(tiny, capture=fake)
    for seed in (0, 1):  # a second call at the same shape: new noise and prompt copied into the same buffers
        args = inputs(tiny, 3, 4, seed)
        assert torch.equal(sampling.denoise(tiny, *args, forward=graphs), sampling.denoise(tiny, *args))
    assert graphs.captures == 1 and graphs.replays == fake.replayed == 8
    sampling.denoise(tiny, *inputs(tiny, 4, 4), forward=graphs)  # another shape: another graph
    assert graphs.captures == 2 and len(graphs) == 2


def test_guidance_passes_share_a_graph_and_keep_their_outputs(tiny: Flux2Transformer) -> None:
    graphs = StepGraphs(tiny, capture=FakeCapture())
    noise, ids, ctx, ctx_ids, levels = inputs(tiny, 3, 3)
    uncond = torch.zeros_like(ctx)
    kwargs: dict[str, Any] = {"guidance": 4.0, "uncond_context": uncond}
    want = sampling.denoise(tiny, noise, ids, ctx, ctx_ids, levels, **kwargs)
    got = sampling.denoise(tiny, noise, ids, ctx, ctx_ids, levels, forward=graphs, **kwargs)
    assert torch.equal(got, want)  # without the clone, the second pass would overwrite the first's prediction
    assert graphs.captures == 1 and graphs.replays == 8


def test_progress_and_cancellation_between_replays(tiny: Flux2Transformer) -> None:
    fake = FakeCapture()
    graphs = StepGraphs(tiny, capture=fake)
    seen: list[tuple[int, int, int]] = []

    class Cancelled(Exception):
        pass

    def on_step(done: int, total: int) -> None:
        seen.append((done, total, fake.replayed))  # each report comes after exactly `done` replays
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sampling.denoise(tiny, *inputs(tiny, 3, 4), forward=graphs, on_step=on_step)
    assert seen == [(1, 4, 1), (2, 4, 2)] and graphs.replays == 2  # no replay after the cancel


def test_bound_and_adapter_key(tiny: Flux2Transformer) -> None:
    graphs = StepGraphs(tiny, capture=FakeCapture(), max_graphs=2)
    for w in (2, 3, 4):
        sampling.denoise(tiny, *inputs(tiny, 2, w), forward=graphs)
    assert len(graphs) == 2 and graphs.captures == 3
    sampling.denoise(tiny, *inputs(tiny, 2, 4), forward=graphs)  # the most recent shape is still there
    assert graphs.captures == 3
    graphs.context_key = (("ink", 0.8),)  # other adapters active: a graph of their own
    sampling.denoise(tiny, *inputs(tiny, 2, 4), forward=graphs)
    assert graphs.captures == 4
    with pytest.raises(ValueError):
        StepGraphs(tiny, max_graphs=0)


def test_the_pipeline_runs_its_steps_through_the_graphs() -> None:
    pipe = load_pipeline("tiny", device="cpu")
    request = GenerationRequest("graphs", 64, 48, seed=5, guidance=None)
    want = pipe.generate(request).images[0].tobytes()
    pipe.step_graphs = StepGraphs(pipe.transformer, capture=FakeCapture())  # what load_pipeline sets on CUDA
    progress: list[int] = []
    got = pipe.generate(request, progress=lambda d, t, m: progress.append(d)).images[0].tobytes()
    assert got == want and pipe.step_graphs.replays == 4 and progress == [1, 2, 3, 4, 5, 6]
