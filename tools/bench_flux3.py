"""The FLUX 3 [klein] rows of tools/bench.py (`--flux3`): ours against diffusers' modular pipeline, interleaved.

    python tools/bench.py --flux3 --preset flux3-mid --sizes 256x256 --refs 0 1 --ref-size 256x256 --runs 3 --threads 1
    python tools/bench.py --flux3 --preset flux3-klein --device cuda --sizes 1024x1024 2048x2048 --refs 0 1 4 --runs 10

Random weights of the preset's shape (`flux3-mid`/`flux3-mid-base` for CPU runs, the real shapes on a GPU). The
reference is `Flux3DistilledAutoBlocks`/`Flux3AutoBlocks` with the prompt upsampler and text encoder blocks
removed, holding our transformer's and autoencoder's weights (through the key maps), called with the prompt
embeddings our text tower made (`prompt_embeds`, and `negative_prompt_embeds` of "" for Base's CFG): both sides run
the same thing, prompt embeddings (and reference pictures) to PNG bytes, with their own defaults (steps, guidance,
noise). Our text tower (transformers' Qwen3 layers, the module the reference's Qwen3-VL text tower is) is timed on
its own. Per row: `--warmup` calls of each, then `--runs` runs alternating which side goes first; medians, the
same-run ratio reference / ours on wall and CPU-thread clocks, and the PSNR of our picture against the reference's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Any

import torch
from bench import Sample, png_bytes, psnr_db, reference_picture, stopwatch
from PIL import Image

from klein_agent.loading import flux3_keymaps, keymaps
from klein_agent.loading.random_init import build_random_flux3
from klein_agent.model.configs import PRESETS, Flux3TransformerConfig
from klein_agent.pipeline.flux3 import Flux3Pipeline
from klein_agent.speedups.devices import resolve_device, resolve_dtype

PROMPT = "a red fox in the snow, photograph"
SEED = 1


def build_ours(preset_name: str, device: torch.device, dtype: torch.dtype) -> Flux3Pipeline:
    """Random weights of the preset's shape (seed 0)."""
    chosen = PRESETS[preset_name]
    transformer, autoencoder, text = build_random_flux3(chosen, seed=0, device=device, dtype=dtype)
    return Flux3Pipeline(
        transformer, autoencoder, text, chosen.sampling, f"random:{preset_name}", preset_name
    )


def build_reference(ours: Flux3Pipeline) -> Any:
    """diffusers' modular pipeline (no upsampler, no text encoder) on `ours`' transformer and autoencoder weights."""
    from diffusers import Flux3Transformer2DModel
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks
    from diffusers.utils import logging as diffusers_logging
    from reference_pipeline import diffusers_autoencoder

    diffusers_logging.set_verbosity_error()
    c = ours.transformer.config
    assert isinstance(c, Flux3TransformerConfig)
    with torch.device("meta"):
        transformer = Flux3Transformer2DModel(
            in_channels=c.in_channels,
            cond_in_channels=c.cond_in_channels,
            num_layers=c.depth,
            num_single_layers=c.depth_single_blocks,
            attention_head_dim=c.head_dim,
            num_attention_heads=c.num_heads,
            joint_attention_dim=c.context_in_dim,
            timestep_channels=c.timestep_channels,
            mlp_ratio=c.mlp_ratio,
            axes_dims_rope=c.axes_dim,
            rope_theta=c.theta,
            eps=c.eps,
            flow_map=c.flow_map,
        )
        vae = diffusers_autoencoder(ours.autoencoder.config)
    transformer.load_state_dict(
        flux3_keymaps.transformer_to_diffusers(ours.transformer.state_dict()), assign=True
    )
    vae.load_state_dict(keymaps.autoencoder_to_diffusers(ours.autoencoder.state_dict()), assign=True)
    blocks = Flux3DistilledAutoBlocks() if c.flow_map else Flux3AutoBlocks()
    for name in ("prompt_upsampler", "text_encoder"):
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=transformer.eval(), vae=vae.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _median(samples: list[Sample], clock: str) -> float:
    return statistics.median(getattr(s, clock) for s in samples)


def bench_row(
    ours: Flux3Pipeline,
    reference: Any,
    size: tuple[int, int],
    refs: list[Image.Image],
    runs: int,
    warmup: int,
    steps: int | None,
) -> dict[str, Any]:
    """One row: text alone, ours and the reference from prompt embeddings to PNG bytes, interleaved."""
    width, height = size
    device = ours.device
    text_samples: list[Sample] = []
    with torch.inference_mode(), stopwatch(device, text_samples):
        embeds = ours.encode_prompt(PROMPT)
    uncond = None if ours.sampling_defaults.distilled else ours.encode_prompt("")
    given = {"height": height, "width": width} if not refs else {}
    cached = {PROMPT: embeds} | ({"": uncond} if uncond is not None else {})
    ours.encode_prompt = cached.__getitem__  # type: ignore[method-assign]  # both sides from the same embeddings

    def run_ours() -> list[Image.Image]:
        return ours.pictures(PROMPT, [SEED], steps=steps, references=refs, **given)

    def run_reference() -> list[Image.Image]:
        extra: dict[str, Any] = {"image": refs if len(refs) > 1 else refs[0]} if refs else {}
        if uncond is not None:
            extra["negative_prompt_embeds"] = uncond[0]
        if steps:
            extra["num_inference_steps"] = steps
        with torch.inference_mode():
            return reference(  # type: ignore[no-any-return]
                prompt_embeds=embeds[0],
                generator=torch.Generator("cpu").manual_seed(SEED),
                output="images",
                **given,
                **extra,
            )

    times: dict[str, list[Sample]] = {"ours": [], "reference": []}
    pictures: dict[str, list[Image.Image]] = {}
    sides = {"ours": run_ours, "reference": run_reference}
    for _ in range(warmup):
        for name, fn in sides.items():
            pictures[name] = fn()
    for run in range(runs):
        order = ["ours", "reference"] if run % 2 == 0 else ["reference", "ours"]
        for name in order:
            with stopwatch(device, times[name]):
                png_bytes(sides[name]())
    peak = None
    # ours alone after the runs (the text tower resident: Flux3Pipeline has no offload yet)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_ours()
        peak = torch.cuda.max_memory_allocated(device)
    del ours.encode_prompt  # back to the class's method
    ms = {name: _median(s, "wall_ms") for name, s in times.items()}
    cpu = {name: _median(s, "cpu_ms") for name, s in times.items()}
    return {
        "size": f"{width}x{height}",
        "references": len(refs),
        "text_ms": text_samples[0].wall_ms,
        "ms": ms,
        "cpu_ms": cpu,
        "ratio": ms["reference"] / ms["ours"],
        "cpu_ratio": cpu["reference"] / cpu["ours"],
        "psnr_vs_reference_db": psnr_db(pictures["ours"], pictures["reference"]),
        "ours_peak_bytes": peak,  # CUDA peak allocated of one of our calls (weights included); None elsewhere
    }


def run_flux3(args: argparse.Namespace) -> int:
    """tools/bench.py --flux3: print (and with --json write) the FLUX 3 rows for `args.preset`."""
    if not isinstance(PRESETS[args.preset].transformer, Flux3TransformerConfig):
        raise SystemExit(
            f"--flux3 needs a FLUX 3 preset (flux3-mid, flux3-mid-base, flux3-klein, ...), not {args.preset}"
        )
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ours = build_ours(args.preset, device, dtype)
    reference = build_reference(ours)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"klein-agent bench --flux3: preset {args.preset}, {device} ({where}), {str(dtype).removeprefix('torch.')}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} interleaved runs after "
        f"{args.warmup} warm-up, medians in ms, prompt embeddings to PNG bytes (cpu = calling thread)"
    )
    print(header, flush=True)
    ref_w, ref_h = (int(v) for v in args.ref_size.split("x"))
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        for count in args.refs:
            refs = [reference_picture(ref_w, ref_h, seed=i) for i in range(count)]
            row = bench_row(ours, reference, (width, height), refs, args.runs, args.warmup, args.steps)
            rows.append(row)
            ms, cpu = row["ms"], row["cpu_ms"]
            print(
                f"{row['size']} refs={count}: ours {ms['ours']:.0f} (cpu {cpu['ours']:.0f})  reference "
                f"{ms['reference']:.0f} (cpu {cpu['reference']:.0f})  ratio {row['ratio']:.2f} (cpu "
                f"{row['cpu_ratio']:.2f})  text {row['text_ms']:.0f}  vs reference {row['psnr_vs_reference_db']:.1f} dB",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "flux3_results": rows}, handle, indent=2)
    return 0
