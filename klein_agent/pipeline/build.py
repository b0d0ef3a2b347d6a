"""Building a pipeline from a model name: `tiny`, `flux3-tiny`, `random:PRESET`, a diffusers-layout folder (FLUX.2
[klein], or FLUX 3 [klein]'s modular-pipeline folder), or a Hugging Face repo id."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from klein_agent.loading.errors import LoRAError
from klein_agent.loading.quantized import QuantizedSummary
from klein_agent.pipeline.flux3 import Flux3Pipeline
from klein_agent.pipeline.klein import KleinPipeline
from klein_agent.rules import families
from klein_agent.rules.buckets import ShapeBucket, select
from klein_agent.rules.loras import adapter_names
from klein_agent.speedups.devices import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

FLOAT16_WARNING = (
    "--dtype float16: FLUX overflows in float16 (activations past 65504), so some pictures come out as NaN and are "
    "refused; use bfloat16 on a GPU (the default there) or float32 on a CPU"
)


def load_pipeline(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    transformer_file: str | None = None,
    allow_download: bool = False,
    offload_text_encoder: bool = False,
    fp8: bool = False,
    compile: bool = False,
    reference_kv_cache_bytes: int | None = None,
    loras: Sequence[tuple[str, float]] = (),
    warm_buckets: str | None = None,
    compile_backend: str = "inductor",
    skip_bad_loras: bool = False,
) -> KleinPipeline | Flux3Pipeline:
    """Build the pipeline a model name points at: `tiny`, a diffusers-layout folder, or a Hugging Face repo id;
    for FLUX 3 [klein] (`flux3-tiny`, `random:flux3-klein[-base]`, a modular-pipeline folder, with
    `transformer_file` a BFL single file) a `Flux3Pipeline`, which takes `loras`, `fp8` and `compile` (with CUDA
    graphs on CUDA) as FLUX.2 does.

    `reference_kv_cache_bytes` bounds the cross-call cache of klein 9B-KV reference keys and values (None: the
    device's default). `loras` are LoRA files with their default scales, loaded (named by file stem) before any
    speed-up. With `compile`, `warm_buckets` names the shape buckets compiled before this returns (`rules.buckets.select`:
    names or positions, "all", "none"; None: none, each bucket compiles on its first request), progress logged at
    INFO on stderr. `compile_backend` is torch.compile's (tests use "eager"). A LoRA file that cannot be loaded raises
    LoRAError; with `skip_bad_loras` (serve: one bad adapter costs that adapter, not the server) it is logged and
    listed in `info.unloaded_loras`, and calls naming it are refused with the reason."""
    # a bad name fails before the model loads; None warms nothing (generate --compile compiles what its call needs)
    warm = select(warm_buckets) if compile and warm_buckets is not None else ()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_dtype == torch.float16:
        # FLUX's activations exceed float16's range (65504): pictures can come out NaN (refused, nothing stored)
        log.warning(FLOAT16_WARNING)
    if _is_flux3(model, allow_download):
        text_device = torch.device("cpu") if offload_text_encoder else torch_device
        flux3 = _flux3_pipeline(
            model, torch_device, torch_dtype, text_device, transformer_file, allow_download
        )
        _load_loras(flux3, loras, skip_bad_loras)
        if fp8:
            _quantize(flux3, torch_device, compile)
        if compile:  # the blocks, the decoder and, on CUDA, graphs of the steps (speedups.cuda_graphs)
            if torch_device.type == "cuda":
                from klein_agent.speedups.cuda_graphs import Flux3StepGraphs

                flux3.step_graphs = Flux3StepGraphs(flux3.transformer)
            _compile(flux3, warm, compile_backend)
        return flux3
    pipeline = _build_pipeline(
        model,
        torch_device,
        torch_dtype,
        transformer_file,
        allow_download,
        offload_text_encoder,
        reference_kv_cache_bytes,
        keep_fp8=not loras,
    )
    _load_loras(pipeline, loras, skip_bad_loras)
    if fp8:
        _quantize(pipeline, torch_device, compile)
    if compile:
        if torch_device.type == "cuda" and not pipeline.kv_references:
            from klein_agent.speedups.cuda_graphs import StepGraphs

            pipeline.step_graphs = StepGraphs(pipeline.transformer)
        _compile(pipeline, warm, compile_backend)
    return pipeline


def _quantize(pipeline: KleinPipeline | Flux3Pipeline, device: torch.device, compile: bool) -> None:
    """--fp8: the transformer's block linears to FP8, the recipe `--compile` decides (`speedups.fp8`)."""
    from klein_agent.speedups.fp8 import (
        FP8_WITHOUT_COMPILE,
        quantize_transformer_,
        recipe_for,
        scaled_mm_available,
    )

    if not scaled_mm_available(device):
        log.warning("--fp8 on %s runs a float32 reference path: numerically FP8, but slow", device)
    recipe = recipe_for(compile)
    if not compile:
        log.warning(FP8_WITHOUT_COMPILE)
    replaced = quantize_transformer_(
        pipeline.transformer, rowwise=recipe.rowwise, use_fast_accum=recipe.use_fast_accum
    )
    log.info("fp8: %d block linears quantized (%s)", len(replaced), recipe)


def _compile(pipeline: KleinPipeline | Flux3Pipeline, warm: Sequence[ShapeBucket], backend: str) -> None:
    """Compile the pipeline's transformer blocks for the bucket menu and its decoder, then warm the `warm`
    buckets, progress logged at INFO on stderr."""
    from klein_agent.pipeline.warmup import compile_pipeline_, warm_up

    compile_pipeline_(pipeline, backend=backend)
    if warm:
        started = time.perf_counter()
        warm_up(
            pipeline,
            warm,
            lambda done, total, message: log.info("compile warm-up %d/%d: %s", done, total, message),
        )
        log.info("compile warm-up done in %.1f s", time.perf_counter() - started)


def _load_loras(
    pipeline: KleinPipeline | Flux3Pipeline, loras: Sequence[tuple[str, float]], skip_bad_loras: bool
) -> None:
    """Attach the LoRA files `loras` ((path, default scale), named by file stem) to either family's pipeline.
    Raises LoRAError for a file that does not fit; with `skip_bad_loras` it is logged and recorded in
    `info.unloaded_loras` instead, so calls naming it are refused with the reason."""
    paths = [Path(path) for path, _ in loras]
    unloaded: list[tuple[str, str]] = []
    for name, path, (_, scale) in zip(adapter_names(paths), paths, loras, strict=True):
        try:
            pipeline.load_lora(path, name, scale)
        except LoRAError as exc:
            if not skip_bad_loras:
                raise
            log.error("LoRA adapter %r not loaded, the server runs without it: %s", name, exc)
            unloaded.append((name, str(exc)))
    if unloaded:
        pipeline.info = replace(pipeline.info, unloaded_loras=tuple(unloaded))


RANDOM_PREFIX = families.RANDOM_PREFIX  # random:klein-4b: random weights of a preset's shape, for benchmarks


def _is_flux3(model: str, allow_download: bool) -> bool:
    """Whether `model` names a FLUX 3 [klein] model: a built-in or random preset of that family, or a folder whose
    modular index names a Flux3 pipeline (a repo id still to be downloaded is looked at once it is here)."""
    from klein_agent.loading.hub import check_model_source, is_flux3

    if model in families.BUILT_IN_MODELS or model.startswith(RANDOM_PREFIX):
        return families.preset_family(model.removeprefix(RANDOM_PREFIX)) is families.FLUX3
    folder = check_model_source(model, allow_download=allow_download)
    return folder is not None and is_flux3(folder)


def _flux3_pipeline(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    text_device: torch.device,
    transformer_file: str | None,
    allow_download: bool,
) -> Flux3Pipeline:
    """A FLUX 3 pipeline: `flux3-tiny[-base]` (random weights from seed 0, drawn on the CPU so every device gets
    the same model), `random:PRESET` (random weights drawn on the device: the real shape's speed), or a folder
    (`loading.flux3_checkpoints`, `transformer_file` a BFL single file)."""
    from klein_agent.loading.random_init import build_random_flux3
    from klein_agent.model.configs import preset

    if model in families.BUILT_IN_MODELS or model.startswith(RANDOM_PREFIX):
        if transformer_file:
            raise ValueError(f"--transformer-file cannot be combined with --model {model}")
        name = model.removeprefix(RANDOM_PREFIX)
        chosen = preset(name)
        built = device if model.startswith(RANDOM_PREFIX) else torch.device("cpu")
        transformer, autoencoder, text = build_random_flux3(chosen, device=built, dtype=dtype)
        return Flux3Pipeline(
            transformer.to(device),
            autoencoder.to(device),
            text.to(text_device),
            chosen.sampling,
            model_name=model,
            variant=name,
        )
    from klein_agent.loading.flux3_checkpoints import load_flux3_components
    from klein_agent.loading.hub import resolve_model_path

    folder = resolve_model_path(model, allow_download=allow_download)
    parts = load_flux3_components(
        folder, device, dtype, transformer_file=transformer_file, text_encoder_device=text_device
    )
    return Flux3Pipeline(
        parts.transformer,
        parts.autoencoder,
        parts.text_embedder,
        parts.sampling,
        model_name=model,
        variant=parts.variant,
    )


def _random_pipeline(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    text_device: torch.device,
    offload_text_encoder: bool,
) -> KleinPipeline:
    """`random:PRESET`: random weights of a preset's shape, made on the device (tools/gpu_check.sh times `serve` on
    the 4B's shape without a checkpoint). The pictures are noise; the speed is the real model's."""
    from klein_agent.loading.random_init import build_random_models
    from klein_agent.model.configs import PRESETS

    name = model.removeprefix(RANDOM_PREFIX)
    if name not in PRESETS:
        raise ValueError(f"--model {model}: no preset {name!r}; choose one of {', '.join(PRESETS)}")
    transformer, autoencoder, text = build_random_models(PRESETS[name], device=device, dtype=dtype)
    return KleinPipeline(
        transformer,
        autoencoder,
        text.to(text_device),
        sampling_defaults=PRESETS[name].sampling,
        model_name=model,
        variant=name,
        offload_text_encoder=offload_text_encoder,
        kv_references=PRESETS[name].kv_references,
    )


def log_quantized(
    summary: QuantizedSummary,
    where: str,
    device: torch.device,
    dtype: torch.dtype,
    fp8_runs: bool,
    for_loras: bool = False,
) -> None:
    """One line on stderr for a BFL-quantized transformer: kept in FP8 (INFO), or dequantized, why, and what that
    costs in memory (WARNING: the user asked for a small file and gets a larger model)."""
    kinds = "/".join(summary.kinds)
    if summary.kept_fp8 and summary.extra_bytes == 0:
        log.info("%s: %s weights kept in FP8 (%d layers, rowwise _scaled_mm)", where, kinds, summary.kept_fp8)
        return
    dtype_name = str(dtype).removeprefix("torch.")
    if for_loras:
        why = "LoRA adapters are loaded and run on plain layers only"
    elif fp8_runs:
        why = (
            "nvfp4 needs a Blackwell FP4 kernel, which is not used here"
            if "nvfp4" in kinds
            else "layers whose sizes are not multiples of 16 cannot run in FP8"
        )
    elif dtype != torch.bfloat16 and device.type == "cuda":
        why = f"FP8 matmuls write bfloat16 and the model runs in {dtype_name}"
    else:
        why = f"{device.type} has no FP8 matmul" + ("" if "fp8r" in kinds else " and no FP4 one")
    kept = f", {summary.kept_fp8} kept in FP8" if summary.kept_fp8 else ""
    log.warning(
        "%s holds %s weights (%d quantized layers%s): %s, so they run dequantized to %s, which takes %s more "
        "memory than the file's quantized weights",
        where,
        kinds,
        summary.layers,
        kept,
        why,
        dtype_name,
        f"{summary.extra_bytes / 2**30:.2f} GiB"
        if summary.extra_bytes >= 2**30
        else f"{summary.extra_bytes / 2**20:.1f} MiB",
    )


def _build_pipeline(
    model: str,
    torch_device: torch.device,
    torch_dtype: torch.dtype,
    transformer_file: str | None,
    allow_download: bool,
    offload_text_encoder: bool,
    reference_kv_cache_bytes: int | None,
    keep_fp8: bool = True,
) -> KleinPipeline:
    # --offload-text-encoder: the encoder is read straight into host memory (8 GB for the 4B never visits the GPU
    # at load); KleinPipeline pins it there once (pipeline.offload.HostResident)
    text_device = torch.device("cpu") if offload_text_encoder else torch_device
    if model == "tiny":
        from klein_agent.loading.random_init import build_tiny
        from klein_agent.model.configs import preset

        if transformer_file:
            raise ValueError("--transformer-file cannot be combined with --model tiny")
        transformer, autoencoder, text = build_tiny()  # built on the host
        return KleinPipeline(
            transformer.to(torch_device, torch_dtype),
            autoencoder.to(torch_device, torch_dtype),
            text.to(text_device, torch_dtype),
            sampling_defaults=preset("tiny").sampling,
            model_name="tiny",
            variant="tiny",
            offload_text_encoder=offload_text_encoder,
        )
    if model.startswith(RANDOM_PREFIX):
        return _random_pipeline(model, torch_device, torch_dtype, text_device, offload_text_encoder)
    from klein_agent.loading.checkpoints import load_components
    from klein_agent.loading.hub import resolve_model_path
    from klein_agent.speedups.fp8 import prequantized_linear_factory

    folder = resolve_model_path(model, allow_download=allow_download)
    # LoRA adapters wrap plain linear layers (model.lora.LoRALinear): with adapters, fp8r layers are dequantized
    factory = prequantized_linear_factory(torch_device, torch_dtype)
    fp8_linear = factory if keep_fp8 else None
    components = load_components(
        folder,
        torch_device,
        torch_dtype,
        transformer_file=transformer_file,
        text_encoder_device=text_device,
        fp8_linear=fp8_linear,
    )
    if components.quantized is not None:
        where = transformer_file or str(folder / "transformer")
        for_loras = factory is not None and fp8_linear is None
        log_quantized(
            components.quantized, where, torch_device, torch_dtype, fp8_linear is not None, for_loras
        )
    return KleinPipeline(
        components.transformer,
        components.autoencoder,
        components.text_embedder,
        sampling_defaults=components.sampling,
        model_name=model,
        variant=components.variant,
        scheduler=components.scheduler,
        offload_text_encoder=offload_text_encoder,
        kv_references=components.kv_references,
        reference_kv_cache_bytes=reference_kv_cache_bytes,
    )
