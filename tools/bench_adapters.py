"""The cost of LoRA and LoKr adapters and masked edits, on random weights of a preset's shape.

    python tools/bench_adapters.py --preset mid --size 512x512 --rank 16 --runs 5

Reports medians (after a warm-up) of: one transformer step without an adapter, with one unfused LoRA adapter active
(how the server runs them), with it merged into the weights, and with one unfused LoKr adapter (factors as peft
shapes them for `--lokr-factor`, w2 rank-decomposed at `--rank` where peft would decompose it); the time to load
each file (read, check, attach); the time to switch adapters either way (unfused: set the active list; merged:
subtract one, add the other); and an inpaint call against an edit of the same size and steps (end to end, caches
warm). The adapters touch every linear layer of every block, the worst case.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from klein_agent.loading.random_init import build_random_models
from klein_agent.model import lora, sampling
from klein_agent.model.configs import PRESETS
from klein_agent.pipeline import KleinPipeline
from klein_agent.rules.masks import Box, boxes_mask
from klein_agent.rules.requests import GenerationRequest


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, float]:
    """Median ms of each function, run in turn within every round, so a busy machine slows all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1000)
    return {key: statistics.median(values) for key, values in times.items()}


def random_adapter(pipe: KleinPipeline, path: Path, rank: int, seed: int) -> Path:
    """An ai-toolkit file with an update for every linear layer in the blocks."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.transformer.named_modules():
        base = module.base if isinstance(module, lora.LoRALinear) else module
        if isinstance(base, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
            if (
                isinstance(module, torch.nn.Linear)
                and "." in name
                and name.rsplit(".", 1)[0].endswith("base")
            ):
                continue
            tensors[f"diffusion_model.{name}.lora_A.weight"] = (
                torch.randn(rank, base.in_features, generator=g) * 0.01
            )
            tensors[f"diffusion_model.{name}.lora_B.weight"] = (
                torch.randn(base.out_features, rank, generator=g) * 0.01
            )
    save_file(tensors, str(path))
    return path


def random_lokr(pipe: KleinPipeline, path: Path, factor: int, rank: int, seed: int) -> Path:
    """A BFL-layout LoKr file with factors for every linear layer in the blocks, shaped as peft shapes them
    (`factorization(dim, factor)`); w2 rank-decomposed where peft would (rank < half its larger side)."""
    from peft.tuners.lokr.layer import factorization

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.transformer.named_modules():
        base = module.base if isinstance(module, lora.LoRALinear) else module
        if not (
            isinstance(module, torch.nn.Linear | lora.LoRALinear) and name.startswith(("double", "single"))
        ):
            continue
        (a, b), (c, d) = factorization(base.out_features, factor), factorization(base.in_features, factor)
        key = f"diffusion_model.{name}"
        tensors[f"{key}.lokr_w1"] = torch.randn(a, c, generator=g) * 0.1
        if rank < max(b, d) / 2:
            tensors[f"{key}.lokr_w2_a"] = torch.randn(b, rank, generator=g) * 0.1
            tensors[f"{key}.lokr_w2_b"] = torch.randn(rank, d, generator=g) * 0.1
        else:
            tensors[f"{key}.lokr_w2"] = torch.randn(b, d, generator=g) * 0.01
    save_file(tensors, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--lokr-factor", type=int, default=-1, help="peft's decompose_factor (-1: near-square)"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    chosen = PRESETS[args.preset]
    transformer, autoencoder, text = build_random_models(chosen)
    pipe = KleinPipeline(
        transformer,
        autoencoder,
        text,
        sampling_defaults=chosen.sampling,
        model_name="random",
        variant=chosen.name,
    )
    loads = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "a": random_adapter(pipe, Path(tmp) / "a.safetensors", args.rank, 1),
            "b": random_adapter(pipe, Path(tmp) / "b.safetensors", args.rank, 2),
            "k": random_lokr(pipe, Path(tmp) / "k.safetensors", args.lokr_factor, args.rank, 3),
        }
        for name, path in files.items():
            start = time.perf_counter()
            pipe.load_lora(path, name)
            loads[name] = (time.perf_counter() - start) * 1000
    h, w = height // 16, width // 16
    model = pipe.transformer
    cfg = model.config
    x = torch.randn(1, h * w, cfg.in_channels)
    context = torch.randn(1, 512, cfg.context_in_dim)
    ctx_ids, ids = sampling.text_ids(512), sampling.image_ids(h, w)
    rope = model.rope(ctx_ids, ids)
    t = torch.full((1,), 0.5)

    def step() -> object:
        with torch.inference_mode():
            return model(x, ids, context, ctx_ids, t, rope=rope)

    def with_adapters(
        active: tuple[tuple[str, float], ...], merged: tuple[tuple[str, float], ...] = ()
    ) -> Callable[[], float]:
        def run() -> float:  # seconds of the step alone: merging happens outside the clock
            lora.activate(model, active)
            lora.merge(model, merged)
            try:
                start = time.perf_counter()
                step()
                return time.perf_counter() - start
            finally:
                lora.merge(model, merged, sign=-1.0)

        return run

    def switch_unfused() -> None:
        lora.activate(model, (("b", 1.0),))
        lora.activate(model, (("a", 1.0),))

    def switch_merged() -> None:  # a merged -> b merged -> a merged, from a merged
        lora.merge(model, (("a", 1.0),), sign=-1.0)
        lora.merge(model, (("b", 1.0),))
        lora.merge(model, (("b", 1.0),), sign=-1.0)
        lora.merge(model, (("a", 1.0),))

    source = Image.radial_gradient("L").convert("RGB").resize((width, height))
    edit = GenerationRequest("a cat", seed=1, steps=args.steps, references=(source,))
    mask = boxes_mask([Box(0.25, 0.25, 0.5, 0.5)], source.size)
    inpaint = GenerationRequest(
        "a cat", seed=1, steps=args.steps, strength=1.0, references=(source,), mask=mask
    )

    def generate(request: GenerationRequest) -> Callable[[], object]:
        def run() -> object:
            lora.activate(model, ())
            return pipe.generate(request)

        return run

    # the step rows time the step only (merging is outside the clock); the switch rows time the switch only
    step_fns = {
        "step, no adapter": with_adapters(()),
        "step, one unfused adapter": with_adapters((("a", 1.0),)),
        "step, merged adapter": with_adapters((), (("a", 1.0),)),
        "step, one unfused LoKr adapter": with_adapters((("k", 1.0),)),
    }
    for fn in step_fns.values():  # warm-up
        fn()
    step_times: dict[str, list[float]] = {key: [] for key in step_fns}
    for _ in range(args.runs):  # in turn within each round, as interleaved_medians does
        for key, fn in step_fns.items():
            step_times[key].append(fn() * 1000)
    results = {key: statistics.median(values) for key, values in step_times.items()}
    results["load, LoRA file (read, check, attach)"] = loads["a"]
    results["load, LoKr file (read, check, attach)"] = loads["k"]
    lora.activate(model, ())
    lora.merge(model, (("a", 1.0),))
    results.update(
        interleaved_medians(
            {"switch a->b->a, unfused": switch_unfused, "switch a->b->a, merged": switch_merged}, args.runs
        )
    )
    lora.merge(model, (("a", 1.0),), sign=-1.0)
    results.update(
        interleaved_medians(
            {
                f"edit {width}x{height}, {args.steps} steps": generate(edit),
                f"inpaint {width}x{height}, {args.steps} steps, strength 1": generate(inpaint),
            },
            args.runs,
        )
    )
    header = (
        f"{args.preset} preset, {width}x{height} ({h * w} tokens), rank {args.rank} on every block linear, LoKr "
        f"factor {args.lokr_factor} ({pipe.adapters['k'].summary}), CPU "
        f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(header, file=sys.stderr)
    print("| measure | median ms |\n|---|---|", file=sys.stderr)
    for key, value in results.items():
        print(f"| {key} | {value:.1f} |", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
