"""Per-stage timings of our pipeline, and of diffusers' Flux2KleinPipeline on the very same weights and noise.

    python tools/bench.py --preset tiny --sizes 256x256 512x512 --refs 0 1 --runs 7 --threads 1
    python tools/bench.py --preset klein-4b --device cuda --sizes 1024x1024 512x512 --refs 0 1 --runs 20

Weights are random, of the preset's shape (`mid` is a mid-size shape for CPU runs): speed does not depend on the
values. Each configuration (one row: an output size and a reference count) is warmed up, then timed `--runs` times.

Fairness on a shared machine. Ours and the reference run INTERLEAVED, run by run, and the order alternates (ours
first on even runs, the reference first on odd ones), so a slow spell of the machine hits both sides alike. Every
timing is reported as wall time and as CPU time of the calling thread (`time.thread_time`): with `--threads 1` the
CPU time is the whole compute and barely moves when other jobs share the cores, so it is the figure to trust on a
busy machine (with more threads it misses the worker threads; on CUDA it is the host's share only). The ratio is
reference / ours of the medians (above 1: we are faster), for both clocks.

Stages (ours): text embedding (uncached), reference encoding (uncached), each denoising step, decode (to pictures),
end to end (prompt to PNG bytes, caches cleared) and a cached retry. Peak memory is OURS ALONE: reset before each of
our end-to-end runs (CUDA peak allocated, or the process's peak RSS via /proc/self/clear_refs on Linux), minus the
memory that only the reference holds (its own copies of encoder layers, its text encoder on the device when ours is
offloaded); our pinned host copies are not device memory and do not count on CUDA.

With `--fp8`, each row first renders its picture with the unquantized weights, then compares our FP8 picture with
it: PSNR in dB, and the run fails (exit status 3) when it falls under `--fp8-min-psnr`.
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import json
import math
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from klein_agent.loading.random_init import build_random_models
from klein_agent.model.configs import PRESETS
from klein_agent.pipeline import KleinPipeline
from klein_agent.rules.requests import GenerationRequest
from klein_agent.speedups.devices import resolve_device, resolve_dtype

ALL_PRESETS = PRESETS
PROMPT = "a red fox in the snow, photograph"

# ------------------------------------------------------------------------------------------------------ clocks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Sample:
    """One timing on both clocks, in milliseconds."""

    wall_ms: float
    cpu_ms: float


@contextmanager
def stopwatch(device: torch.device, into: list[Sample]) -> Iterator[None]:
    """Times the block on the wall clock and on the calling thread's CPU clock (device synced at both ends)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    yield
    sync(device)
    into.append(Sample((time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000))


@dataclass
class Series:
    """Samples per stage name, kept in insertion order."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def add(self, name: str, sample: Sample) -> None:
        self.samples.setdefault(name, []).append(sample)

    def medians(self, clock: str) -> dict[str, float]:
        return {
            name: statistics.median(getattr(s, clock) for s in values)
            for name, values in self.samples.items()
        }


# ------------------------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory of the code between `reset()` and `read()`, in bytes: CUDA's peak allocation, or on the CPU the
    process's peak RSS (VmHWM, reset through /proc/self/clear_refs; where that is refused, the lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type == "cuda" or _clear_refs()
        self.kind = (
            "CUDA peak allocated"
            if device.type == "cuda"
            else ("peak RSS, reset per run" if self.resettable else "process peak RSS (not resettable here)")
        )

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _clear_refs()

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        status = Path("/proc/self/status")
        if status.exists():
            match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
            if match:
                return int(match.group(1)) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _clear_refs() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def reference_only_bytes(reference: Any, pipe: KleinPipeline, device: torch.device) -> int:
    """Bytes on `device` (the host for the CPU) that the reference holds and our pipeline does not share."""
    ours = {
        t.untyped_storage().data_ptr()
        for module in (pipe.transformer, pipe.autoencoder, pipe.text_embedder)
        for t in [*module.parameters(), *module.buffers()]
    }
    seen: set[int] = set()
    total = 0
    for module in (reference.transformer, reference.vae, reference.text_encoder):
        for t in [*module.parameters(), *module.buffers()]:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if t.device.type != device.type or ptr in ours or ptr in seen:
                continue
            seen.add(ptr)
            total += storage.nbytes()
    return total


# ------------------------------------------------------------------------------------------------------ runs


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


def run_ours(pipe: KleinPipeline, request: GenerationRequest, into: Series) -> list[Image.Image]:
    """One measured run of ours: the uncached stages, then end to end, then a cached retry."""
    device = pipe.device
    pipe.clear_caches()
    scratch: list[Sample] = []
    with stopwatch(device, scratch):
        pipe.encode_prompt(request.prompt)
    with stopwatch(device, scratch):
        pipe.encode_references(request.references)
    into.add("text", scratch[0])
    into.add("references", scratch[1])

    # stage boundaries from the progress callback: conditioning done, each step, each decode (device synced)
    marks: list[tuple[str, float, float]] = []

    def on_progress(done: int, total: int, message: str) -> None:
        sync(device)
        marks.append((message, time.perf_counter(), time.thread_time()))

    pipe.clear_caches()
    end_to_end: list[Sample] = []
    with stopwatch(device, end_to_end):
        result = pipe.generate(request, progress=on_progress)
        png_bytes(result.images)
    step = 0
    for (_, wall0, cpu0), (message, wall1, cpu1) in itertools.pairwise(marks):
        sample = Sample((wall1 - wall0) * 1000, (cpu1 - cpu0) * 1000)
        if message.endswith("decoded"):
            into.add("decode", sample)
        else:
            step += 1
            into.add(f"step {step}", sample)
    into.add("end to end", end_to_end[0])

    pipe.clear_caches()
    pipe.encode_prompt(request.prompt)
    pipe.encode_references(request.references)
    retry: list[Sample] = []
    with stopwatch(device, retry):
        png_bytes(pipe.generate(request).images)
    into.add("retry (cached)", retry[0])
    return result.images


def run_reference(reference: Any, pipe: KleinPipeline, request: GenerationRequest, into: Series) -> None:
    """One measured end-to-end run of diffusers' pipeline, called with its own defaults (PNG bytes included)."""
    generators = [torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.num_images)]
    samples: list[Sample] = []
    with stopwatch(pipe.device, samples), torch.inference_mode():
        images = reference(
            prompt=request.prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps or pipe.info.default_steps,
            generator=generators,
            image=list(request.references) or None,
            text_encoder_out_layers=pipe.text_embedder.output_layers,
        ).images
        png_bytes(images)
    into.add("end to end", samples[0])


@dataclass
class Row:
    """One configuration's results."""

    size: str
    references: int
    ours: Series
    reference: Series | None
    peak_bytes: int
    fp8_psnr_db: float | None = None

    def as_json(self, memory_kind: str) -> dict[str, Any]:
        ours_wall, ours_cpu = self.ours.medians("wall_ms"), self.ours.medians("cpu_ms")
        out: dict[str, Any] = {
            "size": self.size,
            "references": self.references,
            "ours": ours_wall,
            "ours_cpu": ours_cpu,
            "reference_ms": None,
            "reference_cpu_ms": None,
            "ratio": None,
            "cpu_ratio": None,
            "peak_memory_bytes": self.peak_bytes,
            "peak_memory": f"{self.peak_bytes / 2**30:.2f} GiB ({memory_kind}, ours alone)",
            "fp8_psnr_db": self.fp8_psnr_db,
        }
        if self.reference is not None:
            ref_wall = self.reference.medians("wall_ms")["end to end"]
            ref_cpu = self.reference.medians("cpu_ms")["end to end"]
            out |= {
                "reference_ms": ref_wall,
                "reference_cpu_ms": ref_cpu,
                "ratio": ref_wall / ours_wall["end to end"],
                "cpu_ratio": ref_cpu / ours_cpu["end to end"] if ours_cpu["end to end"] > 0 else None,
            }
        return out


def measure_row(
    pipe: KleinPipeline,
    reference: Any,
    request: GenerationRequest,
    *,
    runs: int,
    warmup: int,
    memory: PeakMemory,
    held_by_reference: int,
) -> Row:
    """Warm-up, then `runs` interleaved runs (ours / reference, the order alternating); medians kept per stage."""
    ours, theirs = Series(), Series() if reference is not None else None
    peak = 0
    for i in range(warmup + runs):
        timed = i >= warmup
        ours_run, ref_run = (ours if timed else Series()), (theirs if timed else Series())

        def measure_ours(into: Series = ours_run) -> None:
            nonlocal peak
            memory.reset()
            run_ours(pipe, request, into)
            peak = max(peak, memory.read() - held_by_reference)

        def measure_reference(into: Series | None = ref_run) -> None:
            if reference is not None and into is not None:
                run_reference(reference, pipe, request, into)

        order: list[Callable[[], None]] = [measure_ours, measure_reference]
        for step in order if i % 2 == 0 else reversed(order):
            step()
    size = f"{request.width}x{request.height}"
    return Row(size, len(request.references), ours, theirs, peak)


# ------------------------------------------------------------------------------------------------------ fp8 gate


def psnr_db(a: list[Image.Image], b: list[Image.Image]) -> float:
    """PSNR of 8-bit pictures `a` against `b` (all pixels together); inf when identical."""
    x = torch.cat([torch.frombuffer(bytearray(i.tobytes()), dtype=torch.uint8).float() for i in a])
    y = torch.cat([torch.frombuffer(bytearray(i.tobytes()), dtype=torch.uint8).float() for i in b])
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(ALL_PRESETS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sizes", nargs="+", default=["256x256"], help="WxH output sizes")
    parser.add_argument("--refs", nargs="+", type=int, default=[0], help="reference counts")
    parser.add_argument("--ref-size", default="1024x1024", help="WxH of each reference picture")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before anything")
    parser.add_argument(
        "--fp8", action="store_true", help="our transformer blocks in float8 (reference stays)"
    )
    parser.add_argument(
        "--fp8-min-psnr",
        type=float,
        default=25.0,
        help="with --fp8: fail under this PSNR vs unquantized (dB)",
    )
    parser.add_argument("--compile", action="store_true", help="compile our transformer blocks")
    parser.add_argument("--offload-text-encoder", action="store_true", help="text encoder in host memory")
    parser.add_argument("--no-reference", action="store_true", help="skip diffusers even where installed")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--kv", action="store_true", help="klein 9B-KV rows instead (tools/bench_kv.py)")
    parser.add_argument("--flux3", action="store_true", help="FLUX 3 rows instead (tools/bench_flux3.py)")
    parser.add_argument(
        "--step-cache",
        nargs="+",
        default=None,
        metavar="KIND[:THRESHOLD]",
        help="step-cache rows instead, each setting against no cache (tools/bench_step_cache.py)",
    )
    parser.add_argument("--base", action="store_true", help="with --step-cache: the Base models' sampling")
    return parser.parse_args(argv)


def build_pipeline(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, kv_references: bool = False
) -> KleinPipeline:
    """Random weights of `args.preset`'s shape (seed 0), with klein 9B-KV semantics when `kv_references`."""
    chosen = (
        replace(ALL_PRESETS[args.preset], kv_references=True) if kv_references else ALL_PRESETS[args.preset]
    )
    if chosen.text_encoder.vocab_size < 272:
        chosen = replace(chosen, text_encoder=replace(chosen.text_encoder, vocab_size=272))
    torch.manual_seed(0)
    transformer, autoencoder, text = build_random_models(chosen, seed=0, device=device, dtype=dtype)
    return KleinPipeline(
        transformer,
        autoencoder,
        text,
        sampling_defaults=chosen.sampling,
        model_name=f"random:{chosen.name}",
        variant=chosen.name,
        offload_text_encoder=args.offload_text_encoder,
        kv_references=kv_references,
    )


def reference_for(pipe: KleinPipeline, args: argparse.Namespace) -> Any:
    """diffusers' pipeline on `pipe`'s weights (tools/reference_pipeline.py), or None with --no-reference or
    without diffusers."""
    if args.no_reference:
        return None
    try:
        from reference_pipeline import reference_pipeline
    except ImportError:
        print("diffusers not installed: reference column skipped", file=sys.stderr)
        return None
    return reference_pipeline(pipe)


def requests_for(args: argparse.Namespace) -> list[GenerationRequest]:
    ref_w, ref_h = (int(v) for v in args.ref_size.split("x"))
    out = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        for count in args.refs:
            refs = tuple(reference_picture(ref_w, ref_h, seed=i) for i in range(count))
            out.append(GenerationRequest(PROMPT, width, height, seed=1, steps=args.steps, references=refs))
    return out


def format_row(row: dict[str, Any]) -> str:
    stages = "  ".join(f"{k} {v:.1f}" for k, v in row["ours"].items())
    line = f"{row['size']} refs={row['references']}: {stages}  (cpu e2e {row['ours_cpu']['end to end']:.1f})"
    if row["reference_ms"] is not None:
        cpu_ratio = f"{row['cpu_ratio']:.2f}x" if row["cpu_ratio"] else "n/a"
        line += (
            f"  reference {row['reference_ms']:.1f} (cpu {row['reference_cpu_ms']:.1f})"
            f"  ratio {row['ratio']:.2f}x (cpu {cpu_ratio})"
        )
    if row["fp8_psnr_db"] is not None:
        line += f"  fp8 vs unquantized {row['fp8_psnr_db']:.1f} dB"
    return line + f"  peak {row['peak_memory']}"


def compile_and_warm(
    pipe: KleinPipeline, requests: list[GenerationRequest], device: torch.device
) -> dict[str, float]:
    """--compile as `serve --compile` runs it (shape buckets, the decoder, CUDA graphs on CUDA), then the warm-up of
    the buckets the requests fall in, timed per bucket (seconds, compile included)."""
    from klein_agent.pipeline.warmup import compile_pipeline_, warm_up
    from klein_agent.rules.buckets import bucket_for, image_tokens

    compile_pipeline_(pipe)
    if device.type == "cuda" and not pipe.kv_references:
        from klein_agent.speedups.cuda_graphs import StepGraphs

        pipe.step_graphs = StepGraphs(pipe.transformer)
    needed = []
    for request in requests:
        resolved = pipe.resolve(request)
        tokens = image_tokens((resolved.width, resolved.height), resolved.reference_sizes)
        bucket = bucket_for(tokens)
        if bucket is not None and bucket not in needed:
            needed.append(bucket)
    seconds = warm_up(
        pipe, needed, lambda done, total, message: print(f"warm-up {done}/{total}: {message}", flush=True)
    )
    return {bucket.name: s for bucket, s in zip(needed, seconds, strict=True)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kv:
        from bench_kv import run_kv

        return run_kv(args)
    if args.flux3:
        from bench_flux3 import run_flux3

        return run_flux3(args)
    if args.step_cache:
        from bench_step_cache import run_step_cache

        return run_step_cache(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = build_pipeline(args, device, dtype)
    reference = reference_for(pipe, args)
    requests = requests_for(args)

    unquantized: list[list[Image.Image]] = []
    if args.fp8:
        from klein_agent.speedups.fp8 import quantize_transformer_, recipe_for

        with torch.inference_mode():
            unquantized = [pipe.generate(request).images for request in requests]
        recipe = recipe_for(args.compile)  # rowwise scales and fast accumulation only compiled, as serve does
        quantize_transformer_(pipe.transformer, rowwise=recipe.rowwise, use_fast_accum=recipe.use_fast_accum)
    warm_up_s: dict[str, float] = {}
    if args.compile:
        warm_up_s = compile_and_warm(pipe, requests, device)

    memory = PeakMemory(device)
    held_by_reference = reference_only_bytes(reference, pipe, device) if reference is not None else 0
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    header = (
        f"klein-agent bench: preset {args.preset}, {device} ({machine or platform.machine()}), "
        f"{str(dtype).removeprefix('torch.')}{', fp8' if args.fp8 else ''}{', compiled' if args.compile else ''}"
        f"{', text encoder offloaded' if args.offload_text_encoder else ''}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.runs} interleaved runs after {args.warmup} warm-up, "
        f"medians in ms (wall; cpu = calling thread)"
    )
    print(header, flush=True)
    results = []
    failed_gate = False
    for k, request in enumerate(requests):
        row = measure_row(
            pipe,
            reference,
            request,
            runs=args.runs,
            warmup=args.warmup,
            memory=memory,
            held_by_reference=held_by_reference,
        )
        if args.fp8:
            with torch.inference_mode():
                row.fp8_psnr_db = psnr_db(pipe.generate(request).images, unquantized[k])
            failed_gate |= row.fp8_psnr_db < args.fp8_min_psnr
        data = row.as_json(memory.kind)
        results.append(data)
        print(format_row(data), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "results": results, "warm_up_s": warm_up_s}, handle, indent=2)
    if failed_gate:
        print(
            f"FP8 gate failed: a row is under {args.fp8_min_psnr} dB from the unquantized picture",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
