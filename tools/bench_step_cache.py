"""The step-cache rows of tools/bench.py (`--step-cache`): what each setting skips, saves and changes.

    python tools/bench.py --step-cache magcache:0.06 magcache:0.12 magcache:0.25 --base --preset mid \
        --sizes 256x256 --runs 2 --warmup 1 --threads 2
    python tools/bench.py --step-cache magcache:0.06 magcache:0.25 --preset mid --sizes 256x256 --steps 4
    python tools/bench.py --step-cache magcache:0.06 magcache:0.25 --base --preset klein-base-4b --device cuda \
        --sizes 1024x1024 --runs 3

Random weights of the preset's shape (`--base`: with the Base models' sampling, 50 steps and CFG 4.0 unless
`--steps` says otherwise). Per run, in turn: the call without a cache, then one call per setting, each prompt to PNG
bytes with every cache cleared, the same prompt and seed. Reported per setting: transformer passes computed and
skipped (two a step with CFG), the medians of the denoising and end-to-end wall times and of the end-to-end CPU time
of the calling thread, their ratio to the uncached call's (above 1: faster), and the PSNR of the picture against the
uncached one. With `--threads 1` the CPU time is the whole compute and the figure to trust on a busy machine (as in
tools/bench.py); on CUDA it is the host's share only, so there the wall time is the figure. The pictures of random weights are
not photographs: the PSNR says how far the rule moves these weights' output, not how a real checkpoint's looks.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from bench import PROMPT, build_pipeline, png_bytes, psnr_db, sync

from klein_agent.model.configs import BASE_SAMPLING, PRESETS
from klein_agent.pipeline import KleinPipeline
from klein_agent.rules.requests import GenerationRequest, GenerationResult
from klein_agent.rules.step_caches import StepCache, parse_step_cache_argument
from klein_agent.speedups.devices import resolve_device, resolve_dtype


def _call(pipe: KleinPipeline, request: GenerationRequest) -> tuple[float, float, GenerationResult]:
    """One call, every cache cleared, prompt to PNG bytes: (wall ms, calling thread's CPU ms, result)."""
    pipe.clear_caches()
    sync(pipe.device)
    start, cpu = time.perf_counter(), time.thread_time()
    result = pipe.generate(request)
    png_bytes(result.images)
    sync(pipe.device)
    return (time.perf_counter() - start) * 1000, (time.thread_time() - cpu) * 1000, result


def measure(
    pipe: KleinPipeline, request: GenerationRequest, caches: list[StepCache], runs: int, warmup: int
) -> list[dict[str, Any]]:
    """Rows for no cache and each setting of `caches`, runs interleaved (the uncached call first each run)."""
    settings: list[StepCache | None] = [None, *caches]
    walls: dict[int, list[float]] = {k: [] for k in range(len(settings))}
    cpus: dict[int, list[float]] = {k: [] for k in range(len(settings))}
    denoise: dict[int, list[float]] = {k: [] for k in range(len(settings))}
    last: dict[int, GenerationResult] = {}
    for i in range(warmup + runs):
        for k, cache in enumerate(settings):
            wall, cpu, result = _call(pipe, replace(request, step_cache=cache))
            if i >= warmup:
                walls[k].append(wall)
                cpus[k].append(cpu)
                denoise[k].append(result.timings_ms["denoise"])
            last[k] = result
    passes_per_step = 2 if last[0].resolved.cfg else 1
    total = passes_per_step * last[0].resolved.steps
    base_wall, base_denoise = statistics.median(walls[0]), statistics.median(denoise[0])
    base_cpu = statistics.median(cpus[0])
    rows = []
    for k, cache in enumerate(settings):
        skipped = last[k].cache_hits.get("steps_skipped", 0)
        wall, den, cpu = (
            statistics.median(walls[k]),
            statistics.median(denoise[k]),
            statistics.median(cpus[k]),
        )
        rows.append(
            {
                "setting": "none" if cache is None else f"{cache.kind}:{cache.threshold:g}",
                "passes_computed": total - skipped,
                "passes_skipped": skipped,
                "denoise_ms": den,
                "end_to_end_ms": wall,
                "denoise_speedup": base_denoise / den,
                "end_to_end_speedup": base_wall / wall,
                "end_to_end_cpu_ms": cpu,
                "end_to_end_cpu_speedup": base_cpu / cpu if cpu > 0 else None,
                "psnr_vs_no_cache_db": psnr_db(last[k].images, last[0].images),
            }
        )
    return rows


def format_row(size: str, row: dict[str, Any]) -> str:
    """One table line."""
    db = row["psnr_vs_no_cache_db"]
    cpu_speedup = "n/a" if row["end_to_end_cpu_speedup"] is None else f"{row['end_to_end_cpu_speedup']:.2f}x"
    return (
        f"| {size} | {row['setting']} | {row['passes_computed']} / {row['passes_skipped']} "
        f"| {row['denoise_ms']:.0f} | {row['end_to_end_ms']:.0f} | {row['denoise_speedup']:.2f}x "
        f"| {row['end_to_end_speedup']:.2f}x | {row['end_to_end_cpu_ms']:.0f} | {cpu_speedup} "
        f"| {'identical' if db == float('inf') else f'{db:.1f}'} |"
    )


def run_step_cache(args: argparse.Namespace) -> int:
    """`bench.py --step-cache KIND[:THRESHOLD] ...`: prints the table, writes --json when given."""
    if not args.base:
        return _run_step_cache(args)
    # The preset's shape with the Base models' sampling (mid has no Base variant of its own), registered only
    # while this runs: the registry is global, and the tests call this in-process.
    name = f"{args.preset}+base"
    PRESETS[name] = replace(PRESETS[args.preset], sampling=BASE_SAMPLING)
    try:
        return _run_step_cache(argparse.Namespace(**{**vars(args), "preset": name}))
    finally:
        del PRESETS[name]


def _run_step_cache(args: argparse.Namespace) -> int:
    caches = [parse_step_cache_argument(text) for text in args.step_cache]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = build_pipeline(args, device, dtype)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    info = pipe.info
    steps = args.steps or info.default_steps
    header = (
        f"klein-agent step-cache bench: preset {args.preset}, {device} ({machine or platform.machine()}), "
        f"{info.dtype}, {steps} steps, {'CFG ' + str(info.default_guidance) if not info.distilled else 'no CFG'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} interleaved runs after "
        f"{args.warmup} warm-up, medians (wall ms)"
    )
    print(header, flush=True)
    print("| size | cache | passes computed / skipped | denoise ms | end to end ms | denoise speed-up "
          "| end-to-end speed-up | end to end cpu ms | cpu speed-up | PSNR vs no cache (dB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        request = GenerationRequest(PROMPT, width, height, seed=1, steps=args.steps)
        for row in measure(pipe, request, caches, args.runs, args.warmup):
            results.append({"size": size, **row})
            print(format_row(size, row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "results": results}, handle, indent=2)
    return 0
