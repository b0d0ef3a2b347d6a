"""`--compile`: compiling the pipeline for the shape buckets, and warming them before the server reports ready.

The menu and the rule that maps a request to a bucket are `rules.buckets`; the compiled call that marks each
bucket's dynamic range is `speedups.compilation`. Here they meet the pipeline: `compile_pipeline_` compiles the
transformer blocks for the menu and the decoder for every size, and `warm_up` runs each chosen bucket's example once
(one transformer forward at its token count, one decode at its output size), so the first requests of any size in a
warmed bucket compile nothing. Warm-up is reported as progress through `report(done, total, message)` (the server's
load logs it to stderr) and returns each bucket's seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from klein_agent.model import flux3_sampling, sampling
from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.rules import limits
from klein_agent.rules.buckets import MENU, ShapeBucket, check_menu
from klein_agent.speedups.compilation import (
    ShapeBuckets,
    compile_decoder_,
    compile_transformer_,
    use_compile_cache,
)

if TYPE_CHECKING:
    from klein_agent.pipeline.flux3 import Flux3Pipeline
    from klein_agent.pipeline.klein import KleinPipeline

log = logging.getLogger(__name__)

WarmUpReport = Callable[[int, int, str], None]  # (buckets done, buckets in all, message)


def compile_pipeline_(
    pipeline: KleinPipeline | Flux3Pipeline,
    menu: Sequence[ShapeBucket] = MENU,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = "max-autotune-no-cudagraphs",
    decoder: bool = True,
) -> ShapeBuckets:
    """Compile `pipeline`'s transformer blocks for the buckets of `menu` and (with `decoder`) its decoder, lazily;
    Inductor's on-disk cache goes to the klein-agent folder (`speedups.compilation.use_compile_cache`). Returns the
    transformer's bucket state. Raises ValueError for a menu whose ranges overlap or do not increase."""
    check_menu(menu)
    if backend == "inductor":
        log.info("compile: Inductor cache in %s", use_compile_cache())
    ranges = [(b.min_tokens, b.max_tokens) for b in menu]
    buckets = compile_transformer_(pipeline.transformer, backend=backend, mode=mode, token_ranges=ranges)
    if decoder:
        compile_decoder_(pipeline.autoencoder, backend=backend)
    return buckets


def warm_up(
    pipeline: KleinPipeline | Flux3Pipeline,
    buckets: Sequence[ShapeBucket],
    report: WarmUpReport | None = None,
) -> list[float]:
    """Run each bucket's example once through the (compiled) transformer and decoder: random tokens, no prompt, no
    picture kept. Returns the seconds each bucket took (compile included). Progress goes to `report`, one call
    before the first bucket and one after each."""
    seconds: list[float] = []
    total = len(buckets)
    if report:
        report(0, total, f"compiling {total} shape buckets")
    for k, bucket in enumerate(buckets, start=1):
        started = time.perf_counter()
        if isinstance(pipeline.transformer, Flux3Transformer):
            _run_flux3_example(pipeline, bucket)  # type: ignore[arg-type]
        else:
            _run_example(pipeline, bucket)  # type: ignore[arg-type]
        seconds.append(time.perf_counter() - started)
        if report:
            report(k, total, f"bucket {bucket.name} ({bucket.example_tokens} tokens) in {seconds[-1]:.1f} s")
    return seconds


@torch.inference_mode()  # as sampling.denoise runs: grad mode is part of what the compiled graphs are guarded on
def _run_example(pipeline: KleinPipeline, bucket: ShapeBucket) -> None:
    model, device, dtype = pipeline.transformer, pipeline.device, pipeline.dtype
    factor = pipeline.latent_factor
    width, height = bucket.example_size
    h, w = height // factor, width // factor
    grids = [
        (s[1] // factor, s[0] // factor) for s in [bucket.example_reference_size] * bucket.example_references
    ]
    generator = torch.Generator("cpu").manual_seed(0)
    channels = model.config.in_channels

    def tokens(count: int) -> torch.Tensor:
        return torch.randn(1, count, channels, generator=generator).to(device, dtype)

    text_length = getattr(pipeline.text_embedder, "max_length", 512)
    context = torch.randn(1, text_length, model.config.context_in_dim, generator=generator).to(device, dtype)
    context_ids = sampling.text_ids(text_length).to(device)
    noisy, noisy_ids = tokens(h * w), sampling.image_ids(h, w).to(device)
    timestep = torch.full((1,), 0.5, device=device, dtype=dtype)
    references = sum(gh * gw for gh, gw in grids)
    with pipeline.attention.transformer():  # the kernel order requests run with
        if grids and pipeline.kv_references:  # klein 9B-KV: references as kept keys and values
            kept = model.reference_kv(tokens(references), sampling.reference_ids(grids).to(device))
            model(noisy, noisy_ids, context, context_ids, timestep, reference_kv=kept)
        elif grids:
            ids = torch.cat((noisy_ids, sampling.reference_ids(grids).to(device)))
            model(torch.cat((noisy, tokens(references)), dim=1), ids, context, context_ids, timestep)
        else:
            model(noisy, noisy_ids, context, context_ids, timestep)
    pipeline.decode(sampling.unpack(noisy, h, w))


@torch.inference_mode()
def _run_flux3_example(pipeline: Flux3Pipeline, bucket: ShapeBucket) -> None:
    """FLUX 3's warm-up of `bucket`: one transformer forward at its example (one text window, the output's tokens,
    the references' on their own mode) and one decode, random tokens, nothing kept."""
    model, device, dtype = pipeline.transformer, pipeline.device, pipeline.dtype
    factor = limits.SIZE_MULTIPLE
    width, height = bucket.example_size
    h, w = height // factor, width // factor
    ref_w, ref_h = bucket.example_reference_size
    grids = [(ref_h // factor, ref_w // factor)] * bucket.example_references
    generator = torch.Generator("cpu").manual_seed(0)
    config = model.config

    def draw(count: int, channels: int) -> torch.Tensor:
        return torch.randn(1, count, channels, generator=generator).to(device, dtype)

    window = limits.FLUX3_TEXT_WINDOW
    context, context_ids = draw(window, config.context_in_dim), flux3_sampling.text_ids(window).to(device)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    target = torch.zeros_like(t) if config.flow_map else None
    refs = ref_ids = None
    if grids:
        refs = draw(sum(gh * gw for gh, gw in grids), config.cond_in_channels)
        ref_ids = flux3_sampling.reference_ids(grids).to(device)
    noisy = draw(h * w, config.in_channels)
    with pipeline.attention.transformer():  # the kernel order requests run with
        model(
            noisy, flux3_sampling.image_ids(h, w).to(device), context, context_ids, t, target, refs, ref_ids
        )
    pipeline.decode(noisy, height, width, None)
