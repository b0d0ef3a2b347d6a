"""Regional torch.compile of the transformer: each double- and single-stream block, not the whole model.

Why regional. The 4B transformer is 5 double blocks and 20 single blocks of two kinds; the blocks of one kind run
the same code on same-shaped tensors with different weights. Compiling every block in place (`nn.Module.compile`)
makes Dynamo trace one graph per block kind and per input shape, and every block of that kind reuses it (weights
are graph inputs, not constants), so the cold compile costs two block traces instead of 25, and state-dict keys,
hooks and `Flux2Transformer.forward` stay untouched. The glue between blocks (embedders, modulations, RoPE, the
final layer) runs eagerly; it is a negligible share of the time. This is PyTorch's regional compilation
recipe (https://docs.pytorch.org/tutorials/recipes/regional_compilation.html) and what diffusers'
`ModelMixin.compile_repeated_blocks` does; the diffusers guide (huggingface/diffusers
`docs/source/en/optimization/fp16.md`, "Regional compilation") reports the runtime speed-up of full-graph
compilation at 8-10x less compile time for many diffusion architectures.

Shape policy (no size buckets here). With `dynamic=False` every new input shape — batch (num_images, doubled by
CFG), image plus reference tokens, text tokens (always 512 from the pipeline) — compiles each block kind once more,
specialised and autotuned for exactly that shape; later requests of that shape reuse it. The first request at a
new size therefore pays the compile (seconds; longer with max-autotune's kernel benchmarking), which a server
should pay at start-up by warming the sizes it expects. Inductor's on-disk caches (FX graph and autotune results,
on by default) make later processes cheaper. `dynamic=True` avoids the recompiles at the price of shape-generic
kernels; it is offered, not the default.

Dynamo keeps at most `recompile_limit` (alias `cache_size_limit`, default 8) compiled variants per code object;
past it, that block kind silently runs eagerly for new shapes — still correct, just uncompiled. Eight shapes is
few for an image server (a handful of resolutions × reference counts × batch sizes), so `compile_transformer_`
raises the limit to RECOMPILE_LIMIT. The limit still matters as a bound: each variant keeps its kernels and
guards alive, and every call checks guards variant by variant, so it should not be unbounded either.

CUDA graphs are left out of the default mode: under regional compilation they would be recorded block by block,
and graph outputs live in a memory pool that later replays overwrite, which the eager glue between blocks would
have to respect. Capturing the whole step loop per shape bucket is the cleaner design and a separate decision;
`mode="max-autotune"` or `"reduce-overhead"` can still be passed to try it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.config
from torch import nn

from klein_agent.model.transformer import DoubleStreamBlock, Flux2Transformer, SingleStreamBlock

# Distinct shapes per block kind that stay compiled. 64 covers several resolutions × reference layouts × batch
# sizes; both block kinds count separately against it, and together against the accumulated limit below.
RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 512

_BLOCK_TYPES = (DoubleStreamBlock, SingleStreamBlock)


def compile_transformer_(
    model: Flux2Transformer,
    *,
    mode: str | None = "max-autotune-no-cudagraphs",
    backend: str | Callable[..., Any] = "inductor",
    dynamic: bool = False,
    fullgraph: bool = False,
) -> None:
    """Compile every double- and single-stream block of `model` in place (regional compilation).

    Compilation itself is lazy: it happens on the first forward at each new input shape. `mode` is an Inductor
    setting and is passed only with `backend="inductor"` (other backends, such as "eager" and "aot_eager" in tests,
    take no mode). `fullgraph=True` turns any graph break inside a block into an error instead of a silent slowdown;
    the blocks have none on CPU (tests check it), but it is off by default so an untested break on another device
    costs speed, not a failed request. Raises Dynamo's per-function recompile limit to at least RECOMPILE_LIMIT
    (a process-wide setting; an already higher limit is kept). Calling it again recompiles from scratch.
    """
    limits = torch._dynamo.config
    limits.cache_size_limit = max(limits.cache_size_limit, RECOMPILE_LIMIT)
    limits.accumulated_cache_size_limit = max(
        limits.accumulated_cache_size_limit, ACCUMULATED_RECOMPILE_LIMIT
    )
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
    if backend == "inductor" and mode is not None:
        options["mode"] = mode
    for block in _blocks(model):
        block.compile(**options)


def _blocks(model: Flux2Transformer) -> list[nn.Module]:
    return [*model.double_blocks, *model.single_blocks]
