"""CUDA graphs for the denoising loop: each transformer step captured once per shape, replayed from static buffers.

Why. A 4-step call at 512x512 on a Hopper GPU is tens of milliseconds of kernels issued by thousands of Python-side
launches (25 blocks x ~30 kernels, per step); the host can fall behind the GPU. A CUDA graph records one step's
launches once and replays them with one call. Regional compilation (speedups.compilation) leaves the glue between
blocks eager, so Inductor's own `mode="reduce-overhead"` would record block by block; here the whole forward
(glue, compiled blocks and all) is one graph.

How. `StepGraphs` stands in for the transformer's call in `sampling.denoise` (its `forward=` argument). The first
call at a shape (all input shapes and dtypes, plus `context_key`: the LoRA adapters the pipeline activated, which
change what the layers compute) copies the inputs into static buffers, runs the step twice on a side stream (which
compiles the bucket if it was not warmed, and lets cuBLAS and the allocator settle), records one step into a graph,
and replays it; later calls at that shape copy the new inputs into the buffers and replay. Every tensor input is
copied each call (the latents and timestep change per step, the prompt embedding and RoPE tables per call), a few
MB at most. The output is cloned out of the graph's pool, because the next replay (classifier-free guidance's
second pass, or the next step) overwrites it.

A graph is per exact shape (CUDA graphs have no dynamic shapes), not per compile bucket; at most `max_graphs` are
kept (least recently used out), each holding its step's activations in a private memory pool. Progress and
cancellation are unchanged: `sampling.denoise` reports after every step, between replays, and a cancelled call
stops there. klein 9B-KV's kept reference keys and values (a per-call tensor tuple) run ungraphed.

FLUX 3 [klein] (`Flux3StepGraphs`): the same, over its forward's positional tensors (image, ids, text, ids,
timestep, the flow map's target timestep, references and their ids; the absent ones None, part of the key).

`capture` is injectable: `capture_cuda` on a GPU, a fake in the CPU tests, so the loop logic (buffers, keys,
replays, clones, the bound) is tested here without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

StepFunction = Callable[..., Tensor]
# capture(step, static_args, static_kwargs) -> (replay, static_output): the output tensor the replay rewrites
Capture = Callable[[StepFunction, Sequence[Tensor], dict[str, Any]], tuple[Callable[[], None], Tensor]]

DEFAULT_MAX_GRAPHS = 4
WARM_UP_RUNS = (
    2  # before capture, on a side stream (PyTorch's recipe for capturing after lazy initialisation)
)


def capture_cuda(
    step: StepFunction, args: Sequence[Tensor], kwargs: dict[str, Any]
) -> tuple[Callable[[], None], Tensor]:
    """Record `step(*args, **kwargs)` (static CUDA tensors) into a CUDA graph: warm-up runs on a side stream,
    then capture. Returns the graph's replay and the output tensor it rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARM_UP_RUNS):
            step(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step(*args, **kwargs)
    return graph.replay, output


@dataclass
class _Graph:
    args: list[Tensor]
    kwargs: dict[str, Any]  # the rope tables, as tensors
    replay: Callable[[], None]
    output: Tensor


class StepGraphs:
    """`model(img, img_ids, txt, txt_ids, timesteps, rope=..., reference_kv=...)` through captured graphs, one per
    shape (see the module docstring). Counts `captures` and `replays` (for tests and reports)."""

    def __init__(
        self, model: nn.Module, *, capture: Capture = capture_cuda, max_graphs: int = DEFAULT_MAX_GRAPHS
    ) -> None:
        if max_graphs < 1:
            raise ValueError("max_graphs must be at least 1")
        self.model = model
        self.capture = capture
        self.max_graphs = max_graphs
        self.context_key: Hashable = ()  # set by the pipeline before a call: what else changes the step
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self.captures = 0
        self.replays = 0

    def __call__(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        reference_kv: Any = None,
    ) -> Tensor:
        """As the transformer's forward; the result is a fresh tensor (not the graph's buffer)."""
        if reference_kv is not None or rope is None:  # not graphed (see the module docstring)
            return self.model(img, img_ids, txt, txt_ids, timesteps, rope=rope, reference_kv=reference_kv)
        args = [img, img_ids, txt, txt_ids, timesteps]
        key = (tuple(_signature(t) for t in (*args, *rope)), self.context_key)
        graph = self._graphs.get(key)
        if graph is None:
            static = [t.clone() for t in args]
            static_rope = {"rope": tuple(t.clone() for t in rope)}
            replay, output = self.capture(self.model, static, static_rope)
            graph = self._keep(key, _Graph(static, static_rope, replay, output))
        else:
            self._graphs.move_to_end(key)
            for buffer, value in zip(graph.args, args, strict=True):
                buffer.copy_(value)
            for buffer, value in zip(graph.kwargs["rope"], rope, strict=True):
                buffer.copy_(value)
        graph.replay()
        self.replays += 1
        return graph.output.clone()

    def _keep(self, key: Hashable, graph: _Graph) -> _Graph:
        """Count a new capture and keep it, dropping the least recently used past `max_graphs`."""
        self.captures += 1
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    def __len__(self) -> int:
        return len(self._graphs)


class Flux3StepGraphs(StepGraphs):
    """`StepGraphs` for `Flux3Transformer(img, img_ids, txt, txt_ids, timesteps, target_timesteps, ref, ref_ids)`:
    one graph per shape of those (None where absent) and `context_key`, the same bound and counts."""

    def __call__(self, *inputs: Tensor | None) -> Tensor:  # type: ignore[override]
        """As the FLUX 3 transformer's forward, positional arguments only; a fresh tensor out."""
        key = (tuple(None if t is None else _signature(t) for t in inputs), self.context_key)
        graph = self._graphs.get(key)
        if graph is None:
            static = [None if t is None else t.clone() for t in inputs]
            replay, output = self.capture(self.model, static, {})  # type: ignore[arg-type]
            graph = self._keep(key, _Graph(static, {}, replay, output))  # type: ignore[arg-type]
        else:
            self._graphs.move_to_end(key)
            for buffer, value in zip(graph.args, inputs, strict=True):
                if buffer is not None and value is not None:
                    buffer.copy_(value)
        graph.replay()
        self.replays += 1
        return graph.output.clone()


def _signature(t: Tensor) -> tuple[Any, ...]:
    return tuple(t.shape), t.dtype, t.device
