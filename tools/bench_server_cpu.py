"""CPU time the MCP server spends per call, outside the model: the figure to trust on a shared machine.

`tools/bench_server.py` reports the server's cost as wall time (round trip minus the model's wall time), which
swings with other jobs' load. This tool takes, over the same calls, the process's CPU time minus the CPU time of
the engine's thread (`klein-engine`, which runs the model; with OMP_NUM_THREADS=1 torch computes on that thread
alone). What is left is the server's own CPU work per call: validation, decoding, the PNG encode and store write,
the preview, the result and the protocol. Works on trees before and after `ImageStore.list` became `list_images`.

    OMP_NUM_THREADS=1 python tools/bench_server_cpu.py --calls 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
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


def engine_clock() -> int:
    """The CPU clock id of the engine's thread (named `klein-engine`); raises LookupError if it is not running."""
    for thread in threading.enumerate():
        if thread.name == "klein-engine" and thread.ident is not None:
            return time.pthread_getcpuclockid(thread.ident)
    raise LookupError("no thread named klein-engine: is the engine started?")


async def cpu_row(state: Studio, mode: str, tool: str, args: dict[str, Any], calls: int) -> dict:
    """Server CPU ms per call (process CPU minus engine-thread CPU), median of per-call values, after 5 warm-ups."""
    clock = engine_clock()
    server: list[float] = []
    async with Client(build_server(state), mode=mode) as client:
        for k in range(5 + calls):
            arguments = {**args, "seed": k} if tool != "view_image" else args
            p0, e0 = time.process_time(), time.clock_gettime(clock)
            result = await client.call_tool(tool, arguments)
            p1, e1 = time.process_time(), time.clock_gettime(clock)
            if result.is_error:
                raise RuntimeError(str(getattr(result.content[0], "text", result.content[0])))
            if k >= 5:
                server.append(((p1 - p0) - (e1 - e0)) * 1000)
    return {"tool": tool, "mode": mode, "server_cpu_ms": statistics.median(server), "min": min(server)}


async def main_async(args: argparse.Namespace) -> None:
    generator = load_pipeline("tiny")
    with tempfile.TemporaryDirectory(prefix="klein-bench-") as scratch:
        engine = Engine(lambda: generator, max_queue=8)
        state = Studio(
            engine,
            ImageStore(Path(scratch) / "store"),
            InputPolicy(allowed_dirs=(Path(scratch),)),
            StudioConfig(max_pixels_per_call=MAX_PIXELS_PER_CALL),
        )
        engine.start()
        engine.wait_loaded(60)
        size = {"width": args.size, "height": args.size}
        rows = []
        try:
            for mode in ("auto", "legacy"):
                rows.append(
                    await cpu_row(state, mode, "generate", {"prompt": "a lighthouse", **size}, args.calls)
                )
            store: Any = state.store
            listing = store.list_images if hasattr(store, "list_images") else store.list
            seed_id = listing(limit=1)[0][0].image_id
            for mode in ("auto", "legacy"):
                rows.append(
                    await cpu_row(
                        state, mode, "edit", {"image": seed_id, "prompt": "a red lighthouse"}, args.calls
                    )
                )
            rows.append(await cpu_row(state, "auto", "view_image", {"image_ids": [seed_id]}, args.calls))
        finally:
            await engine.aclose()
            state.store.close()
    print(
        f"server CPU per call outside the model thread, tiny model, {args.size}x{args.size}, {args.calls} calls"
    )
    for r in rows:
        print(
            f"{r['tool']:<12}{r['mode']:<8}{r['server_cpu_ms']:>10.1f}{r['min']:>10.1f}   (ms: median, min)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="measured calls per row, after 5 warm-up calls")
    parser.add_argument("--size", type=int, default=256, help="width and height (default: 256)")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    anyio.run(main_async, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
