"""Per-stage timings of our pipeline, and of diffusers' Flux2KleinPipeline on the very same weights and noise.

    python tools/bench.py --preset tiny --sizes 256x256 512x512 --refs 0 1 --runs 5
    python tools/bench.py --preset klein-4b --device cuda --sizes 1024x1024 512x512 --refs 0 1 --runs 20

Weights are random, of the preset's shape (`mid` is a mid-size shape for CPU runs): speed does not depend on the
values. Each configuration is warmed up, then timed `--runs` times; the table shows medians. Stages: text embedding
(uncached), reference encoding (uncached), each denoising step, decode, and end to end (prompt to PNG bytes, caches
cleared). Where diffusers is installed, its pipeline runs in the same process on the same weights and seeds, and the
ratio reference / ours is shown. Peak memory: CUDA's peak allocation, or the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from klein_agent.loading.random_init import build_random_models
from klein_agent.model.configs import PRESETS
from klein_agent.pipeline import KleinPipeline
from klein_agent.rules.requests import GenerationRequest
from klein_agent.speedups.devices import resolve_device, resolve_dtype

ALL_PRESETS = PRESETS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


def reference_picture(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8)
    return Image.frombytes("RGB", (width, height), pixels.numpy().tobytes())


def png_bytes(images: list[Image.Image]) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


def bench_ours(pipe: KleinPipeline, request: GenerationRequest, runs: int, warmup: int) -> dict[str, Any]:
    device = pipe.device
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for i in range(warmup + runs):
        pipe.clear_caches()
        text_ms = timed(lambda: pipe.encode_prompt(request.prompt), device)
        refs_ms = timed(lambda: pipe.encode_references(request.references), device)
        step_marks: list[float] = []

        def on_progress(done: int, total: int, message: str, marks: list[float] = step_marks) -> None:
            if message.startswith("step") or done == 1:
                sync(device)
                marks.append(time.perf_counter())

        pipe.clear_caches()
        sync(device)
        start = time.perf_counter()
        result = pipe.generate(request, progress=on_progress)
        png_bytes(result.images)
        total_ms = (time.perf_counter() - start) * 1000
        if i < warmup:
            continue
        add("text", text_ms)
        add("references", refs_ms)
        for k, (a, b) in enumerate(itertools.pairwise(step_marks)):
            add(f"step {k + 1}", (b - a) * 1000)
        add("decode", result.timings_ms["decode"])
        add("end to end", total_ms)
        pipe.clear_caches()
        pipe.encode_prompt(request.prompt)
        pipe.encode_references(request.references)
        sync(device)
        start = time.perf_counter()
        png_bytes(pipe.generate(request).images)
        add("retry (cached)", (time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in rows.items()}


def bench_reference(
    reference: Any, pipe: KleinPipeline, request: GenerationRequest, runs: int, warmup: int
) -> float:
    layers = pipe.text_embedder.output_layers
    times = []
    for i in range(warmup + runs):
        generators = [torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.num_images)]
        sync(pipe.device)
        start = time.perf_counter()
        with torch.inference_mode():
            images = reference(
                prompt=request.prompt,
                height=request.height,
                width=request.width,
                num_inference_steps=request.steps or pipe.info.default_steps,
                generator=generators,
                image=list(request.references) or None,
                text_encoder_out_layers=layers,
            ).images
        png_bytes(images)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA peak allocated)"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"{kib / 2**20:.2f} GiB (process peak RSS)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(ALL_PRESETS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sizes", nargs="+", default=["256x256"], help="WxH output sizes")
    parser.add_argument(
        "--refs", nargs="+", type=int, default=[0], help="reference counts (1024x1024 references)"
    )
    parser.add_argument("--ref-size", default="1024x1024", help="WxH of each reference picture")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--fp8", action="store_true", help="our transformer blocks in float8 (reference stays)"
    )
    parser.add_argument("--compile", action="store_true", help="compile our transformer blocks")
    parser.add_argument("--offload-text-encoder", action="store_true", help="text encoder in host memory")
    parser.add_argument("--no-reference", action="store_true", help="skip diffusers even where installed")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--kv", action="store_true", help="klein 9B-KV rows instead (tools/bench_kv.py)")
    args = parser.parse_args(argv)
    if args.kv:
        from bench_kv import run_kv

        return run_kv(args)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    chosen = ALL_PRESETS[args.preset]
    if chosen.text_encoder.vocab_size < 272:
        chosen = replace(chosen, text_encoder=replace(chosen.text_encoder, vocab_size=272))
    torch.manual_seed(0)
    transformer, autoencoder, text = build_random_models(chosen, seed=0, device=device, dtype=dtype)
    pipe = KleinPipeline(
        transformer,
        autoencoder,
        text,
        sampling_defaults=chosen.sampling,
        model_name=f"random:{chosen.name}",
        variant=chosen.name,
        offload_text_encoder=args.offload_text_encoder,
    )
    reference = None
    if not args.no_reference:
        try:
            from reference_pipeline import reference_pipeline

            reference = reference_pipeline(pipe)
        except ImportError:
            print("diffusers not installed: reference column skipped", file=sys.stderr)

    if args.fp8:
        from klein_agent.speedups.fp8 import quantize_transformer_

        quantize_transformer_(pipe.transformer)
    if args.compile:
        from klein_agent.speedups.compilation import compile_transformer_

        compile_transformer_(pipe.transformer)
    ref_w, ref_h = (int(v) for v in args.ref_size.split("x"))
    header = (
        f"klein-agent bench: preset {chosen.name}, {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
        f"{str(dtype).removeprefix('torch.')}{', fp8' if args.fp8 else ''}{', compiled' if args.compile else ''}, torch {torch.__version__}, {args.runs} runs after {args.warmup} warm-up, medians in ms"
    )
    print(header)
    results = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        for count in args.refs:
            refs = tuple(reference_picture(ref_w, ref_h, seed=i) for i in range(count))
            request = GenerationRequest(
                "a red fox in the snow, photograph", width, height, seed=1, steps=args.steps, references=refs
            )
            gc.collect()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ours = bench_ours(pipe, request, args.runs, args.warmup)
            memory = peak_memory(device)
            ref_ms = bench_reference(reference, pipe, request, args.runs, args.warmup) if reference else None
            row = {
                "size": size,
                "references": count,
                "ours": ours,
                "reference_ms": ref_ms,
                "peak_memory": memory,
            }
            results.append(row)
            stages = "  ".join(f"{k} {v:.1f}" for k, v in ours.items())
            ratio = f"  reference {ref_ms:.1f}  ratio {ref_ms / ours['end to end']:.2f}x" if ref_ms else ""
            print(f"{size} refs={count}: {stages}{ratio}  peak {memory}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
