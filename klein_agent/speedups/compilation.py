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

Shape policy: buckets of image tokens, dynamic inside each (`rules.buckets` chooses the menu and explains the
choice against padding and snapping). Every call is batch 1 over 512 text tokens; only L, the image tokens per step,
varies. Given `token_ranges`, each block's call marks L as dynamic within the range that holds it
(`torch._dynamo.mark_dynamic(min=, max=)`: in the image tokens, the joint sequence and the RoPE tables), so Dynamo
compiles one graph per range, guarded by the range, and any size inside reuses it; klein 9B-KV's kept reference
keys and values are dynamic over every reference token count. L past every range gets a static graph of its own
(a warning says so and what it costs), up to `past_menu_shapes` sizes; beyond those the blocks run uncompiled for that
size and the log says so. `dynamic=True` (one shape-generic graph for everything) remains available.

Recompiles measured on the CPU (tools/bench_buckets.py, backend "eager", which counts graphs, not time): the
same 12 requests (10 distinct token counts over the first two buckets) compile 20 graphs with static shapes (2
block kinds x 10 sizes), 4 with buckets (2 x 2), 4 with Dynamo's automatic dynamic shapes (a static graph at the
first size, a dynamic one at the second) and 2 with `dynamic=True`. Buckets are chosen over the last two because the graphs are
compiled at start-up, not on the first requests, and each is tuned for the bucket's example size (its size hint)
rather than for whichever request came first.

Inductor's on-disk caches (FX graph and autotune results) are on, in a klein-agent folder that survives reboots
(`use_compile_cache`: `$TORCHINDUCTOR_CACHE_DIR` if set, else `$XDG_CACHE_HOME/klein-agent/torch-compile`, else
`~/.cache/klein-agent/torch-compile`): a second start of the server at the same shapes loads its kernels instead of
compiling them.

Dynamo keeps at most `recompile_limit` (alias `cache_size_limit`, default 8) compiled variants per code object;
past it, that block kind silently runs eagerly for new shapes. `compile_transformer_` raises the limit to
RECOMPILE_LIMIT, above what the buckets and the past-menu sizes can use, so the explicit, logged fallback above is
the only one. The limit still matters as a bound: each variant keeps its kernels and guards alive.

FLUX 3 [klein] (`Flux3Transformer`) has two block kinds as well: mode blocks (each mode's tokens alone: the text
window, the image, the references) and joint blocks (all of them, in per-mode parts). A bucket is the same range of
image tokens, output plus references. A mode block's stream is marked dynamic within the bucket holding its own
length (the text window and the references fall in a bucket of their own size: one more graph, not one per size);
a joint block's image part is marked within the bucket of output plus references (with references both image
parts from 2 up to the bucket's top), its text part over every prompt length (`FLUX3_TEXT_TOKEN_RANGE`), and the
joint RoPE tables over the sum of those ranges (Dynamo refuses a range on the sum narrower than the parts' ranges
allow). So no size or prompt inside a warmed bucket compiles anything new.

CUDA graphs are left out of the compile mode: under regional compilation Inductor would record them block by block,
and graph outputs live in a memory pool that later replays overwrite, which the eager glue between blocks would have
to respect. `speedups.cuda_graphs` captures the whole step instead (glue and compiled blocks), once per shape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch._dynamo
import torch._dynamo.config
import torch._inductor.config
from torch import Tensor, nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.flux3_transformer import MODES, Flux3Transformer, JointBlock, ModeBlock
from klein_agent.model.transformer import DoubleStreamBlock, Flux2Transformer
from klein_agent.rules.buckets import (
    DECODER_SIDE_RANGE,
    FLUX3_TEXT_TOKEN_RANGE,
    PAST_MENU_SHAPES,
    REFERENCE_TOKEN_RANGE,
)

log = logging.getLogger(__name__)

# Distinct shapes per block kind that stay compiled: the buckets plus the past-menu sizes stay well below it; both
# block kinds count separately against it, and together against the accumulated limit below.
RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 512
# PAST_MENU_SHAPES, REFERENCE_TOKEN_RANGE and DECODER_SIDE_RANGE come from rules.buckets, derived from the limits.

TokenRange = tuple[int, int]


def compile_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels and autotune results across processes: $TORCHINDUCTOR_CACHE_DIR if set,
    else $XDG_CACHE_HOME/klein-agent/torch-compile, else ~/.cache/klein-agent/torch-compile."""
    explicit = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its default (a folder in /tmp, gone at reboot) into the variable the first time it asks
    if explicit and os.path.abspath(explicit) != os.path.abspath(default_cache_dir()):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "klein-agent" / "torch-compile"


def use_compile_cache() -> Path:
    """Point Inductor's on-disk caches at `compile_cache_dir()` (created) and turn the FX graph cache and the local
    autotune cache on (PyTorch's defaults, made explicit). Returns the folder. Call before the first compile."""
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    return folder


class ShapeBuckets:
    """The per-model state of bucketed compilation: the ranges, and the past-menu sizes seen (for the log and the
    bound). Shared by every block of one transformer."""

    def __init__(self, token_ranges: Sequence[TokenRange], past_menu_shapes: int = PAST_MENU_SHAPES) -> None:
        self.token_ranges = tuple(token_ranges)
        self.past_menu_shapes = past_menu_shapes
        self.static_sizes: set[int] = set()  # past-menu sizes given a static graph
        self.eager_sizes: set[int] = set()  # past-menu sizes run uncompiled

    def range_for(self, tokens: int) -> TokenRange | None:
        """The range holding `tokens`, or None past the menu."""
        return next((r for r in self.token_ranges if r[0] <= tokens <= r[1]), None)

    def compiled(self, tokens: int) -> bool:
        """Whether blocks over `tokens` image tokens run compiled; logs the first time a past-menu size is seen."""
        if not self.token_ranges or self.range_for(tokens) is not None or tokens in self.static_sizes:
            return True
        if tokens in self.eager_sizes:
            return False
        top = self.token_ranges[-1][1]
        if len(self.static_sizes) < self.past_menu_shapes:
            self.static_sizes.add(tokens)
            log.warning(
                "compile: %d image tokens is past the compile buckets (largest %d): compiling a static graph for "
                "this size now (seconds on a GPU, minutes with max-autotune); %d more such sizes will compile",
                tokens,
                top,
                self.past_menu_shapes - len(self.static_sizes),
            )
            return True
        self.eager_sizes.add(tokens)
        log.warning(
            "compile: %d image tokens is past the compile buckets (largest %d) and %d past-menu sizes already "
            "compiled: the transformer blocks run uncompiled (eager) at this size",
            tokens,
            top,
            self.past_menu_shapes,
        )
        return False


def compile_transformer_(
    model: Flux2Transformer | Flux3Transformer,
    *,
    mode: str | None = "max-autotune-no-cudagraphs",
    backend: str | Callable[..., Any] = "inductor",
    dynamic: bool = False,
    fullgraph: bool = False,
    token_ranges: Sequence[TokenRange] = (),
    past_menu_shapes: int = PAST_MENU_SHAPES,
) -> ShapeBuckets:
    """Compile every double- and single-stream block of `model` in place (regional compilation); for FLUX 3,
    every mode block and joint block.

    Compilation itself is lazy: it happens on the first forward at each new input shape (or bucket: `token_ranges`,
    inclusive ranges of image tokens per step, increasing, each starting at 2 or more; see the module docstring).
    `mode` is an Inductor setting and is passed only with `backend="inductor"` (other backends, such as "eager" and
    "aot_eager" in tests, take no mode). `fullgraph=True` turns any graph break inside a block into an error
    instead of a silent slowdown; the blocks have none on CPU (tests check it), but it is off by default so an
    untested break on another device costs speed, not a failed request. Raises Dynamo's per-function recompile
    limit to at least RECOMPILE_LIMIT (a process-wide setting; an already higher limit is kept). Calling it again
    recompiles from scratch. Returns the bucket state (its past-menu sizes, for reports and tests).
    """
    limits = torch._dynamo.config
    limits.cache_size_limit = max(limits.cache_size_limit, RECOMPILE_LIMIT)
    limits.accumulated_cache_size_limit = max(
        limits.accumulated_cache_size_limit, ACCUMULATED_RECOMPILE_LIMIT
    )
    buckets = ShapeBuckets(token_ranges, past_menu_shapes)
    for block in _blocks(model):
        block.compile(**_options(mode, backend, dynamic, fullgraph))
        compiled = block._compiled_call_impl  # torch.compile of the block's call, set by Module.compile
        if token_ranges and compiled is not None:
            flux3 = isinstance(block, ModeBlock | JointBlock)
            call = _Flux3BucketedCall if flux3 else _BucketedCall
            block._compiled_call_impl = call(block, compiled, buckets)
    return buckets


def compile_decoder_(
    autoencoder: AutoEncoder,
    *,
    mode: str | None = None,
    backend: str | Callable[..., Any] = "inductor",
    side_range: TokenRange = DECODER_SIDE_RANGE,
) -> None:
    """Compile the autoencoder's decoder in place, its two latent sides dynamic over `side_range` (inclusive, in
    latent pixels of 8 px): one graph for every output size the rules allow, compiled on the first decode.

    The decoder is convolutions, group norms and one single-head attention at the lowest resolution; compiled,
    Inductor fuses each group norm with its activation (and the upsampling) into one kernel instead of several passes
    over the largest activations of the whole pipeline (128 channels at full resolution for a 1024x1024 picture).
    """
    decoder = autoencoder.decoder
    decoder.compile(**_options(mode, backend, False, False))
    compiled = decoder._compiled_call_impl
    assert compiled is not None  # set by Module.compile just above
    low, high = side_range

    def call(z: Tensor) -> Tensor:  # [B, z, H/8, W/8] -> [B, 3, H, W]
        if low <= z.shape[2] <= high and low <= z.shape[3] <= high:
            torch._dynamo.mark_dynamic(z, 2, min=low, max=high)
            torch._dynamo.mark_dynamic(z, 3, min=low, max=high)
        return compiled(z)

    decoder._compiled_call_impl = call


class _BucketedCall:
    """A compiled block's call that first marks the image-token dimension of its inputs dynamic within the bucket
    holding it (see the module docstring); past the menu, it leaves them static or runs the block uncompiled."""

    def __init__(self, block: nn.Module, compiled: Callable[..., Any], buckets: ShapeBuckets) -> None:
        self.block = block
        self.compiled = compiled
        self.buckets = buckets
        self.double = isinstance(block, DoubleStreamBlock)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = _DOUBLE_ARGS if self.double else _SINGLE_ARGS
        bound = dict(zip(names, args, strict=False)) | kwargs
        cos, sin = bound["cos"], bound["sin"]
        if self.double:
            stream, num_txt = bound["img"], bound["txt"].shape[1]
            tokens = stream.shape[1]
        else:
            stream, num_txt = bound["x"], bound.get("num_txt", 0)
            tokens = stream.shape[1] - num_txt
        if not self.buckets.compiled(tokens):
            return self.block._call_impl(*args, **kwargs)
        bucket = self.buckets.range_for(tokens)
        if bucket is not None:
            low, high = bucket
            offset = 0 if self.double else num_txt  # the single blocks' stream is [text, image]
            torch._dynamo.mark_dynamic(stream, 1, min=low + offset, max=high + offset)
            for table in (cos, sin):  # [T + L, Dh/2]
                torch._dynamo.mark_dynamic(table, 0, min=low + num_txt, max=high + num_txt)
        kept = bound.get("reference_kv")
        if kept is not None:  # klein 9B-KV: [1, H, R, Dh] each
            for t in kept:
                torch._dynamo.mark_dynamic(t, 2, min=REFERENCE_TOKEN_RANGE[0], max=REFERENCE_TOKEN_RANGE[1])
        return self.compiled(*args, **kwargs)


class _Flux3BucketedCall(_BucketedCall):
    """`_BucketedCall` for FLUX 3's mode blocks (x, mod, cos, sin) and joint blocks (parts, mods, cos, sin): see
    the module docstring for which dimensions are marked, and in which range."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        joint = isinstance(self.block, JointBlock)
        names = ("parts", "mods", "cos", "sin") if joint else ("x", "mod", "cos", "sin")
        bound = dict(zip(names, args, strict=False)) | kwargs
        parts: list[Tensor] = list(bound["parts"]) if joint else [bound["x"]]  # [B, S_i, D] each
        images = parts[1:] if joint else parts  # a joint block's first part is the text window
        tokens = sum(x.shape[1] for x in images)
        if not self.buckets.compiled(tokens):
            return self.block._call_impl(*args, **kwargs)
        bucket = self.buckets.range_for(tokens)
        if bucket is not None:
            low, high = bucket
            # several image parts: each from 2 (Dynamo specialises 0 and 1) to the bucket's top
            ranges = [(low, high)] if len(images) == 1 else [(2, high)] * len(images)
            if joint:  # a text window outside the range (never from the pipeline) stays static: (n, n)
                text = parts[0].shape[1]
                first, last = FLUX3_TEXT_TOKEN_RANGE
                ranges.insert(0, (first, last) if first <= text <= last else (text, text))
            for x, (first, last) in zip(parts, ranges, strict=True):
                if first < last:
                    torch._dynamo.mark_dynamic(x, 1, min=first, max=last)
            for table in (bound["cos"], bound["sin"]):  # [sum S_i, Dh/2]: the sum of the parts' ranges
                torch._dynamo.mark_dynamic(
                    table, 0, min=sum(r[0] for r in ranges), max=sum(r[1] for r in ranges)
                )
        return self.compiled(*args, **kwargs)


_DOUBLE_ARGS = ("img", "txt", "cos", "sin", "mod_img", "mod_txt", "reference_kv")
_SINGLE_ARGS = ("x", "cos", "sin", "mod", "reference_kv", "num_txt")


def _options(
    mode: str | None, backend: str | Callable[..., Any], dynamic: bool, fullgraph: bool
) -> dict[str, Any]:
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
    if backend == "inductor" and mode is not None:
        options["mode"] = mode
    return options


def _blocks(model: Flux2Transformer | Flux3Transformer) -> list[nn.Module]:
    if isinstance(model, Flux3Transformer):
        modes = [b for m in MODES for b in cast(nn.ModuleList, model.content_mode_blocks[m])]
        return [*modes, *model.txt_mode_blocks, *model.single_blocks]
    return [*model.double_blocks, *model.single_blocks]
