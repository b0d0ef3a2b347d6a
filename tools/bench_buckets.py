"""How many graphs each shape policy compiles for the same requests, and what the bucket warm-up costs.

Runs the transformer of a preset (random weights, batch 1, 512 text tokens as the pipeline runs it) once per
request size under four policies and counts the graphs Dynamo compiles (a counting backend: the count is what is
measured, not the kernels): static shapes (`dynamic=False`, one graph per size), Dynamo's automatic dynamic shapes
(`dynamic=None`), fully dynamic (`dynamic=True`) and klein-agent's buckets (`rules.buckets.MENU`, dynamic within each
bucket). With `--inductor`, it also times `pipeline.warmup.warm_up` of the chosen buckets with Inductor (the real
compile, on this machine's CPU) and the first request after it.

    python tools/bench_buckets.py --preset tiny
    python tools/bench_buckets.py --preset tiny --inductor --warm-buckets 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch._dynamo
import torch._dynamo.config
from torch._dynamo.testing import CompileCounter

from klein_agent.loading.random_init import build_random_models
from klein_agent.model import sampling
from klein_agent.model.configs import preset
from klein_agent.rules.buckets import MENU, bucket_for, image_tokens
from klein_agent.speedups.compilation import compile_transformer_

# Output sizes (and references of 1024x1024) an agent's session might ask for: 12 requests, 10 distinct token
# counts, over the first two buckets, as (width, height, references)
REQUESTS = [
    (512, 512, 0),
    (768, 512, 0),
    (512, 768, 0),
    (1024, 1024, 0),
    (1024, 768, 0),
    (768, 1024, 0),
    (880, 1168, 0),
    (640, 640, 0),
    (384, 384, 0),
    (1024, 576, 0),
    (832, 832, 0),
    (1216, 832, 0),
]


def count_graphs(preset_name: str, policy: str, requests: list[tuple[int, int, int]]) -> int:
    torch._dynamo.reset()
    model = build_random_models(preset(preset_name))[0]
    counter = CompileCounter()
    if policy == "buckets":
        ranges = [(b.min_tokens, b.max_tokens) for b in MENU]
        compile_transformer_(model, backend=counter, token_ranges=ranges)
    else:
        dynamic = {"static": False, "automatic": None, "dynamic": True}[policy]
        compile_transformer_(model, backend=counter, dynamic=dynamic)  # type: ignore[arg-type]
    for width, height, refs in requests:
        run(model, width, height, refs)
    return counter.frame_count


@torch.inference_mode()
def run(model: torch.nn.Module, width: int, height: int, refs: int, text: int = 512) -> None:
    tokens = image_tokens((width, height), [(1024, 1024)] * refs)
    config = model.config  # type: ignore[attr-defined]
    img = torch.zeros(1, tokens, config.in_channels)
    ids = sampling.image_ids(1, tokens)  # the positions' values do not change the shapes
    ctx = torch.zeros(1, text, config.context_in_dim)
    model(img, ids, ctx, sampling.text_ids(text), torch.tensor([0.5]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument(
        "--inductor", action="store_true", help="also time the Inductor warm-up on this machine"
    )
    parser.add_argument("--warm-buckets", default="1")
    parser.add_argument("--skip-counts", action="store_true", help="only the Inductor timing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    sizes = {image_tokens((w, h), [(1024, 1024)] * r) for w, h, r in REQUESTS}
    touched = {bucket_for(t).name for t in sizes}  # type: ignore[union-attr]
    print(f"{len(REQUESTS)} requests, {len(sizes)} distinct token counts, buckets touched: {sorted(touched)}")
    figures: dict[str, object] = {"requests": len(REQUESTS), "distinct_sizes": len(sizes)}
    for policy in () if args.skip_counts else ("static", "automatic", "dynamic", "buckets"):
        graphs = count_graphs(args.preset, policy, REQUESTS)
        figures[f"graphs_{policy}"] = graphs
        print(f"| {policy} | {graphs} graphs |")
    if args.inductor:
        figures.update(time_inductor(args.preset, args.warm_buckets))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def time_inductor(preset_name: str, warm: str) -> dict[str, float]:
    from klein_agent.pipeline import load_pipeline
    from klein_agent.rules.buckets import select
    from klein_agent.rules.requests import GenerationRequest

    torch._dynamo.reset()
    if preset_name != "tiny":
        raise SystemExit(
            "--inductor runs the tiny pipeline only (the CPU cannot compile a larger one in minutes)"
        )
    from torch._dynamo.callback import CallbackTrigger, on_compile_start

    compiles: list[
        str
    ] = []  # every frame Dynamo compiles, whatever the backend does with it (cache hits too)
    on_compile_start(
        lambda a: compiles.append(a.compile_id) if a.callback_trigger == CallbackTrigger.DYNAMO else None
    )

    from klein_agent.pipeline.warmup import warm_up

    pipe = load_pipeline("tiny", device="cpu", compile=True)
    buckets = select(warm)
    started = time.perf_counter()
    seconds = warm_up(pipe, buckets)
    total = time.perf_counter() - started
    graphs_after_warm_up = len(compiles)
    example = buckets[0].example_size
    inside = (example[0] - 16, example[1])  # a new size inside the first warmed bucket
    started = time.perf_counter()
    pipe.generate(GenerationRequest("after warm-up", inside[0], inside[1], seed=1))
    first = time.perf_counter() - started
    started = time.perf_counter()
    pipe.generate(GenerationRequest("after warm-up", inside[0], inside[1], seed=2))
    second = time.perf_counter() - started
    for bucket, s in zip(buckets, seconds, strict=True):
        print(f"warm-up, Inductor, bucket {bucket.name}: {s:.1f} s")
    graphs = len(compiles)
    print(
        f"warm-up total {total:.1f} s ({graphs_after_warm_up} graphs); first request at {inside[0]}x{inside[1]} "
        f"after it {first:.2f} s, next {second:.2f} s; graphs compiled by the two requests: "
        f"{graphs - graphs_after_warm_up}"
    )
    return {"warm_up_s": total, "first_request_s": first, "second_request_s": second, "graphs": graphs}


if __name__ == "__main__":
    main()
