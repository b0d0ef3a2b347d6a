"""What the MCP server itself costs per call, on top of the model.

For each call: the tool round trip through an in-process MCP client, minus the model time the engine measured
(`model_ms` in the result: wall time inside ImageGenerator.generate). What is left is the server's own work:
argument validation, queueing, the PNG encode and durable store write (fsync), the preview encode, building the
result, and the protocol (the 2026 direct path for mode "auto", JSON-RPC over memory streams for "legacy").

    python tools/bench_server.py                 # tiny model, 256x256, 60 calls per row after 5 warm-up calls
    python tools/bench_server.py --calls 100 --size 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

from klein_agent.pipeline import load_pipeline
from klein_agent.rules.limits import MAX_PIXELS_PER_CALL
from klein_agent.server.app import build_server
from klein_agent.service.engine import Engine
from klein_agent.service.inputs import InputPolicy
from klein_agent.service.store import ImageStore
from klein_agent.service.studio import Studio, StudioConfig


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench_row(
    state: Studio, mode: str, tool: str, args: dict[str, Any], calls: int, warmup: int
) -> dict:
    trips: list[float] = []
    models: list[float] = []
    async with Client(build_server(state), mode=mode) as client:
        for k in range(warmup + calls):
            arguments = {**args, "seed": k} if tool != "view_image" else args
            t0 = time.perf_counter()
            result = await client.call_tool(tool, arguments)
            trip = (time.perf_counter() - t0) * 1000
            if result.is_error:
                raise RuntimeError(result.content[0].text)
            if k >= warmup:
                trips.append(trip)
                models.append(float((result.structured_content or {}).get("model_ms", 0.0)))
    overhead = [t - m for t, m in zip(trips, models, strict=True)]
    return {
        "mode": mode,
        "tool": tool,
        "calls": calls,
        "trip_ms": statistics.median(trips),
        "model_ms": statistics.median(models),
        "overhead_ms": statistics.median(overhead),
        "overhead_p10": percentile(overhead, 0.1),
        "overhead_p90": percentile(overhead, 0.9),
    }


async def bench_burst(state: Studio, args: dict[str, Any], calls: int, rounds: int) -> dict:
    """`calls` generate calls sent at once, `rounds` times: wall time per call against model time per call.

    With storing on the engine's worker, the next call waits for the last one's PNG encode and fsync; with storing
    off the worker it does not, so this row shows what a busy agent (or several) gets per call."""
    per_call: list[float] = []
    models: list[float] = []
    async with Client(build_server(state), mode="auto") as client:
        for r in range(rounds + 1):
            done: list[float] = []

            async def one(k: int, done: list[float] = done, r: int = r) -> None:
                result = await client.call_tool("generate", {**args, "seed": 1000 * r + k})
                if result.is_error:
                    raise RuntimeError(result.content[0].text)
                done.append(float((result.structured_content or {}).get("model_ms", 0.0)))

            t0 = time.perf_counter()
            async with anyio.create_task_group() as group:
                for k in range(calls):
                    group.start_soon(one, k)
            wall = (time.perf_counter() - t0) * 1000
            if r > 0:  # the first round warms up
                per_call.append(wall / calls)
                models.append(statistics.mean(done))
    return {
        "mode": "auto",
        "tool": f"{calls} at once",
        "calls": calls * rounds,
        "trip_ms": statistics.median(per_call),
        "model_ms": statistics.median(models),
        "overhead_ms": statistics.median([p - m for p, m in zip(per_call, models, strict=True)]),
        "overhead_p10": min(p - m for p, m in zip(per_call, models, strict=True)),
        "overhead_p90": max(p - m for p, m in zip(per_call, models, strict=True)),
    }


async def main_async(args: argparse.Namespace) -> None:
    generator = load_pipeline("tiny")
    with tempfile.TemporaryDirectory(prefix="klein-bench-") as scratch:
        engine = Engine(lambda: generator, max_queue=8)
        state = Studio(
            engine,
            ImageStore(Path(scratch) / "store"),
            InputPolicy(allowed_dirs=(Path(scratch),)),
            StudioConfig(
                max_pixels_per_call=MAX_PIXELS_PER_CALL
            ),  # the tiny model: CUDA's budget on a CPU too
        )
        engine.start()
        engine.wait_loaded(60)
        size = {"width": args.size, "height": args.size}
        rows = []
        try:
            for mode in args.modes:
                rows.append(
                    await bench_row(
                        state, mode, "generate", {"prompt": "a lighthouse", **size}, args.calls, 5
                    )
                )
            seed_id = state.store.list_images(limit=1)[0][0].image_id
            for mode in args.modes:
                rows.append(
                    await bench_row(
                        state, mode, "edit", {"image": seed_id, "prompt": "a red lighthouse"}, args.calls, 5
                    )
                )
            rows.append(await bench_row(state, "auto", "view_image", {"image_ids": [seed_id]}, args.calls, 5))
            rows.append(
                await bench_burst(state, {"prompt": "a lighthouse", **size}, 8, max(1, args.calls // 8))
            )
        finally:
            await engine.aclose()
            state.store.close()
    print(
        f"server cost per call, tiny model, {args.size}x{args.size}, median of {args.calls} calls after warm-up"
    )
    print(f"{'tool':<12}{'mode':<8}{'round trip':>12}{'model':>10}{'server':>10}{'p10':>8}{'p90':>8}   (ms)")
    for r in rows:
        print(
            f"{r['tool']:<12}{r['mode']:<8}{r['trip_ms']:>12.1f}{r['model_ms']:>10.1f}{r['overhead_ms']:>10.1f}"
            f"{r['overhead_p10']:>8.1f}{r['overhead_p90']:>8.1f}"
        )
    print("('8 at once': wall time per call of 8 calls sent together, against the model time per call)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=60, help="measured calls per row, after 5 warm-up calls")
    parser.add_argument("--size", type=int, default=256, help="width and height (default: 256)")
    parser.add_argument("--modes", nargs="+", default=["auto", "legacy"], choices=["auto", "legacy"])
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    anyio.run(main_async, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
