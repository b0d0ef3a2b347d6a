"""The klein 9B-KV rows of tools/bench.py (`--kv`): edits with 1, 2, 4 references, run by run interleaved.

    python tools/bench.py --kv --preset mid --sizes 256x256 --refs 1 2 4 --ref-size 256x256 --runs 3 --warmup 1
    python tools/bench.py --kv --preset klein-9b-kv --device cuda --sizes 1024x1024 --refs 1 2 4 --runs 10

Random weights of the preset's shape, run with klein 9B-KV's semantics. Per run, in turn: our first call (every cache
empty), our retry on the same references with a new prompt and a new seed (the reference keys and values cached,
the prompt not), our text-to-image call of the same output size with a new prompt, and diffusers'
`Flux2KleinKVPipeline` on the same weights and noise (its first call; it keeps nothing across calls). Each is prompt
to PNG bytes. Medians; ratios are same-run: reference / first call, and retry / text-to-image (the goal: at most
1.1), printed beside the same ratio in FLOPs (counted once per row with torch's FlopCounterMode): a retry skips the
references' own tokens but its queries still attend to every kept reference key, so large references put a floor
over 1 under the ratio that no implementation goes below. The first call's picture is checked against the
reference's (PSNR on the 8-bit pixels).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from bench import build_pipeline, png_bytes, psnr_db, reference_for, reference_picture, sync
from PIL import Image
from torch.utils import flop_counter

from klein_agent.pipeline import KleinPipeline
from klein_agent.rules.requests import GenerationRequest
from klein_agent.speedups.devices import resolve_device, resolve_dtype


def _timed(device: torch.device, fn: Any) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - start) * 1000, out


def _reference_call(reference: Any, pipe: KleinPipeline, request: GenerationRequest) -> list[Image.Image]:
    with torch.inference_mode():
        return reference(  # type: ignore[no-any-return]
            prompt=request.prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps or pipe.info.default_steps,
            generator=[torch.Generator("cpu").manual_seed(request.seed or 0)],
            image=list(request.references),
            text_encoder_out_layers=pipe.text_embedder.output_layers,
        ).images


def bench_row(
    pipe: KleinPipeline, reference: Any, request: GenerationRequest, runs: int, warmup: int
) -> dict[str, Any]:
    """One (size, reference count) row: medians in ms of first call, retry, text-to-image and the reference."""
    device = pipe.device
    times: dict[str, list[float]] = {}
    db = None
    for i in range(warmup + runs):
        pipe.clear_caches()
        first_ms, first = _timed(device, lambda: _png_result(pipe, request))
        retry = replace(request, prompt=f"{request.prompt}, take {i}", seed=(request.seed or 0) + 1000 + i)
        retry_ms, retried = _timed(device, lambda r=retry: _png_result(pipe, r))
        assert retried[0].cache_hits.get("reference_kv") == 1, "the retry missed the reference cache"
        text_only = replace(retry, prompt=f"{retry.prompt} alone", references=())
        t2i_ms, _ = _timed(device, lambda r=text_only: _png_result(pipe, r))
        ref_ms = None
        if reference is not None:
            ref_ms, ref_images = _timed(device, lambda: _reference_call(reference, pipe, request))
            png_bytes(ref_images)
            db = psnr_db(first[0].images[:1], ref_images[:1])
        if i < warmup:
            continue
        for name, value in (("first call", first_ms), ("retry", retry_ms), ("text-to-image", t2i_ms)):
            times.setdefault(name, []).append(value)
        if ref_ms is not None:
            times.setdefault("reference", []).append(ref_ms)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"ms": medians, "psnr_vs_reference_db": db}


def _count_cpu_attention() -> None:
    """FlopCounterMode counts the CUDA attention kernels but not the CPU one; count it with the same formula."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _cpu_sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
            return int(flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))


def flop_ratio(pipe: KleinPipeline, request: GenerationRequest) -> dict[str, float]:
    """The arithmetic of one first call, one retry and one text-to-image call (TFLOP, counted by torch's
    FlopCounterMode: every matmul, convolution and attention that ran), so a measured retry/t2i ratio can be read
    against what the model must compute: the retry's queries still attend to every kept reference key."""
    _count_cpu_attention()
    pipe.clear_caches()
    out = {}
    retry = replace(request, prompt=f"{request.prompt}, counted", seed=(request.seed or 0) + 999)
    calls = (("first call", request), ("retry", retry), ("text-to-image", replace(retry, references=())))
    for name, call in calls:
        with flop_counter.FlopCounterMode(display=False) as counter:
            pipe.generate(call)
        out[name] = counter.get_total_flops() / 1e12
    pipe.clear_caches()
    return out


def _png_result(pipe: KleinPipeline, request: GenerationRequest) -> tuple[Any, list[bytes]]:
    result = pipe.generate(request)
    return result, png_bytes(result.images)


def run_kv(args: argparse.Namespace) -> int:
    """tools/bench.py --kv: build a KV pipeline of `args.preset`'s shape and print (and write) the KV rows."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = build_pipeline(args, device, dtype, kv_references=True)
    reference = reference_for(pipe, args)
    ref_w, ref_h = (int(v) for v in args.ref_size.split("x"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"klein-agent bench --kv: preset {args.preset} (KV semantics), {device} ({where}), "
        f"{str(dtype).removeprefix('torch.')}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.runs} runs after {args.warmup} warm-up, interleaved, medians in ms"
    )
    print(header)
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        for count in args.refs:
            if count < 1:
                continue
            refs = tuple(reference_picture(ref_w, ref_h, seed=i) for i in range(count))
            request = GenerationRequest(
                "a red fox in the snow, photograph", width, height, seed=1, steps=args.steps, references=refs
            )
            gc.collect()
            tflop = flop_ratio(pipe, request)
            row = bench_row(pipe, reference, request, args.runs, args.warmup)
            row["tflop"] = tflop
            floor = tflop["retry"] / tflop["text-to-image"]
            ms = row["ms"]
            held = pipe.reference_kv_cache_bytes[0]
            row.update(size=size, references=count, ref_size=args.ref_size, kv_bytes=held)
            rows.append(row)
            ratio = (
                f"  reference {ms['reference']:.1f} ({ms['reference'] / ms['first call']:.2f}x)"
                if "reference" in ms
                else ""
            )
            db = row["psnr_vs_reference_db"]
            print(
                f"{size} refs={count}x{args.ref_size}: first {ms['first call']:.1f}  retry {ms['retry']:.1f}  "
                f"text-to-image {ms['text-to-image']:.1f} (retry/t2i {ms['retry'] / ms['text-to-image']:.2f}, "
                f"in FLOPs {floor:.2f}){ratio}"
                f"  kept K/V {held / 2**20:.1f} MiB"
                + (f"  first vs reference {db:.1f} dB" if db is not None else "")
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "kv_results": rows}, handle, indent=2)
    return 0
