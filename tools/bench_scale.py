"""Issue 20's numbers, in one run on this machine: images per second with 1 and 2 generator replicas of the tiny
model, the latency a call gains on its way front-end → replica → store, the cache-hit rate of retries on the same
references, and the writes per second of the shared store alone.

    python tools/bench_scale.py                   # about 2-4 minutes on 2 cores; --quick: a smoke run

It always runs contained, as `tools/bench_store.py --contained` does: it re-runs itself inside a loopback-only
network and PID namespace (tests/store_servers.py) with a throwaway PostgreSQL 15 (unix socket, fsync off) and
SeaweedFS `weed mini`, then starts a local Ray cluster there (tests/ray_cluster.py: token auth on, usage stats off).

What each figure is:

- **images/s, 1 vs 2 replicas.** `klein-agent deploy --model tiny` twice, one application of 1 replica and one of 2
  (each replica 1 CPU and 1 torch thread, OMP_NUM_THREADS=1: a replica stands for a GPU), driven from this process
  through the front-end's own `RayGenerator` with `--in-flight` calls in flight per replica from a pool of threads
  (default 1: what the application lets a front-end send per replica). Rounds alternate the order
  (1 then 2, 2 then 1) so a drift in the machine's load touches both; the ratio is the median of the rounds' own
  ratios.
- **one front-end's engine, 1 vs 2 replicas.** The same calls, all submitted at once to one front-end's `Engine`
  over the same `RayGenerator`s, in the same rounds: the engine runs as many at once as the application says it
  takes (`KleinReplica.in_flight`: its replicas x one call), so one front-end keeps every replica busy.
- **added latency.** A real MCP client calls `generate` on `serve --http --generator ray:APP` over the shared store
  (PostgreSQL + S3), one call at a time. Added = the client's round trip − the model time the replica measured
  for that call (`timings_ms.total` in the stored recipe, read afterwards, not timed): MCP over HTTP, the engine,
  the Ray call and its streamed progress, the PNG, S3 PUT and PostgreSQL commit, the preview. Split into the Ray
  hop (the engine's wall time around the replica call − the replica's model time) and the rest. The issue's
  "front-end → replica → store" is the call's span inside the front-end (`elapsed_ms` of the tool result, from
  the tools/call reaching `Studio.make` to its pictures stored) − the model time: the round trip without the
  client's MCP exchange with the front-end, which is the same with or without scale-out.
- **cache hits of retries.** `edit` calls on the same stored references, alternating between two front-ends; a
  retry is a hit when the replica that ran it reports reference latents from its cache (`cache_hits.references`,
  as the replica returns it, so the figure moves when routing by reference lands). Each reference's first call
  is cold by construction and not counted.
- **store writes/s.** `ImageStore.put` of a 256² PNG on PostgreSQL + S3 alone (tools/bench_store.py's code).

Medians over runs after warm-up; p50/p95 of the calls. The model time dominates the images/s runs: the tiny model
at the chosen size and steps takes ~0.7 s a call here, the Ray round trip ~10-60 ms (printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKEN = "bench-scale-token-0123456789abcdef"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="picture side in px (default 256)")
    parser.add_argument(
        "--steps", type=int, default=4, help="denoising steps (default 4, the distilled default)"
    )
    parser.add_argument("--calls", type=int, default=8, help="calls per timed images/s run (default 8)")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=1,
        metavar="K",
        help="calls in flight per replica in the pool-driven images/s runs (default 1: one call per replica)",
    )
    parser.add_argument(
        "--engine-in-flight",
        type=int,
        metavar="K",
        help="cap the one-engine runs at K calls at once (1: the engine before issue 20's concurrency, for a "
        "before/after in one run); default: what the application says",
    )
    parser.add_argument("--runs", type=int, default=3, help="timed rounds of 1 and 2 replicas (default 3)")
    parser.add_argument(
        "--latency-calls", type=int, default=20, help="timed calls for the latency (default 20)"
    )
    parser.add_argument("--references", type=int, default=4, help="distinct references retried (default 4)")
    parser.add_argument("--retries", type=int, default=3, help="retries per reference (default 3)")
    parser.add_argument("--puts", type=int, default=100, help="puts per store run (default 100)")
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks that the bench runs")
    parser.add_argument("--json", type=Path, help="also write the figures to this file as JSON")
    parser.add_argument("--contained", action="store_true", help="(set when re-run inside the namespace)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.calls, args.runs, args.latency_calls = 64, 2, 1, 2
        args.references, args.retries, args.puts = 1, 1, 5
    return args


# ---- statistics ---------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


# ---- replicas: images per second ----------------------------------------------------------------------------------


def deploy(app: str, replicas: int, env: dict[str, str]) -> None:
    """`klein-agent deploy --model tiny --replicas N --app APP`, as a user runs it; raises with its output."""
    command = [sys.executable, "-m", "klein_agent", "deploy", "--model", "tiny", "--replicas", str(replicas)]
    done = subprocess.run(
        [*command, "--app", app], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"deploy {app} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def generator_of(app: str) -> Any:
    """The front-end's `RayGenerator` for `app` (connects this process to the cluster once)."""
    from klein_agent.replica.handle import ray_generator_factory

    return ray_generator_factory(app)()


def images_per_s(
    generator: Any, args: argparse.Namespace, calls: int, in_flight: int, seed: int
) -> tuple[float, list[float]]:
    """Pictures per second of `calls` calls with `in_flight` at once (threads), each its own seed, and each call's
    model time as the replica measured it (ms): if it grows with the replicas, they are short of CPU, not of
    Ray."""
    from klein_agent.rules.requests import GenerationRequest

    def one(k: int) -> float:
        request = GenerationRequest("a kite", args.size, args.size, seed=seed + k, steps=args.steps)
        model_ms: float = generator.generate(request).timings_ms["total"]
        return model_ms

    with ThreadPoolExecutor(in_flight) as pool:
        start = time.perf_counter()
        model_ms = list(pool.map(one, range(calls)))
        return calls / (time.perf_counter() - start), model_ms


def engine_images_per_s(engine: Any, args: argparse.Namespace, calls: int, seed: int) -> float:
    """Pictures per second of `calls` calls submitted at once to one front-end's engine (it runs as many at once
    as its generator takes, the rest wait in its queue)."""
    import anyio

    from klein_agent.rules.requests import GenerationRequest

    async def all_at_once() -> None:
        async with anyio.create_task_group() as tasks:
            for k in range(calls):
                request = GenerationRequest("a kite", args.size, args.size, seed=seed + k, steps=args.steps)
                tasks.start_soon(engine.run, request)

    start = time.perf_counter()
    anyio.run(all_at_once)
    return calls / (time.perf_counter() - start)


class Capped:
    """`generator` taking at most `cap` calls at once (`--engine-in-flight`)."""

    def __init__(self, generator: Any, cap: int) -> None:
        self._generator, self.info = generator, generator.info
        self.max_in_flight = min(cap, generator.max_in_flight)

    def generate(self, request: Any, progress: Any = None) -> Any:
        return self._generator.generate(request, progress)


def engine_of(generator: Any, calls: int, cap: int | None) -> Any:
    """A front-end's engine over `generator` (at most `cap` calls at once, when given), with room in its queue
    for `calls` calls at once."""
    from klein_agent.service.engine import Engine, EngineState

    engine = Engine(lambda: generator if cap is None else Capped(generator, cap), max_queue=calls)
    engine.start()
    if engine.wait_loaded(60) != EngineState.READY:
        raise RuntimeError(f"the engine did not start: {engine.status().error}")
    return engine


def replica_scaling(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    deploy("bench-1", 1, env)
    deploy("bench-2", 2, env)
    one, two = generator_of("bench-1"), generator_of("bench-2")
    images_per_s(one, args, 2, 2, seed=0)  # warm-up: every replica has run once
    images_per_s(two, args, 4, 4, seed=0)
    engines = {n: engine_of(g, args.calls, args.engine_in_flight) for n, g in ((1, one), (2, two))}
    rates: dict[int, list[float]] = {1: [], 2: []}
    engine_rates: dict[int, list[float]] = {1: [], 2: []}
    model_ms: dict[int, list[float]] = {1: [], 2: []}
    ratios, engine_ratios = [], []
    for r in range(args.runs):
        order = [(1, one), (2, two)] if r % 2 == 0 else [(2, two), (1, one)]
        got, through = {}, {}
        for n, generator in order:
            got[n], times = images_per_s(generator, args, args.calls, args.in_flight * n, seed=1000 * (r + 1))
            rates[n].append(got[n])
            model_ms[n] += times
            through[n] = engine_images_per_s(engines[n], args, args.calls, seed=1000 * (r + 1) + 500)
            engine_rates[n].append(through[n])
        ratios.append(got[2] / got[1])
        engine_ratios.append(through[2] / through[1])
        print(
            f"  round {r + 1}: 1 replica {got[1]:.2f}/s, 2 replicas {got[2]:.2f}/s; one engine: "
            f"{through[1]:.2f}/s, {through[2]:.2f}/s",
            file=sys.stderr,
        )
    for engine in engines.values():
        engine.close()
    return {
        "one": spread(rates[1]),
        "two": spread(rates[2]),
        "ratio": spread(ratios),
        "engine_in_flight": {n: engines[n].status().max_in_flight for n in engines},
        "engine_one": spread(engine_rates[1]),
        "engine_two": spread(engine_rates[2]),
        "engine_ratio": spread(engine_ratios),
        "model_ms_one": round(statistics.median(model_ms[1]), 1),
        "model_ms_two": round(statistics.median(model_ms[2]), 1),
        # what the replicas delivered of what their model time allows (n replicas, each 1000/model_ms a second):
        # below 1 by Ray's dispatch, the round trips and idle gaps; CPU contention lengthens model_ms instead
        "efficiency_one": round(statistics.median(rates[1]) * statistics.median(model_ms[1]) / 1000, 3),
        "efficiency_two": round(statistics.median(rates[2]) * statistics.median(model_ms[2]) / 2000, 3),
    }


# ---- front-ends: added latency and cache hits ---------------------------------------------------------------------


@contextlib.contextmanager
def front_end(name: str, options: list[str], env: dict[str, str], scratch: Path) -> Iterator[int]:
    """`klein-agent serve --http OPTIONS` (a Ray front-end: `--generator ray:APP` on the shared store, no --model;
    the embedded baseline: `--model tiny` on a folder); yields its port."""
    log_path = scratch / f"{name}.log"
    command = [
        sys.executable,
        "-m",
        "klein_agent",
        "serve",
        "--http",
        "--port",
        "0",
        "--no-default-dirs",
        *options,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not (
            found := re.search(r"streamable HTTP at http://127\.0\.0\.1:(\d+)/mcp", log_path.read_text())
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"front-end {name} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        from tests.http_helpers import wait_listening

        wait_listening(int(found.group(1)))
        yield int(found.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ray_front_end(
    name: str, app: str, env: dict[str, str], scratch: Path
) -> contextlib.AbstractContextManager[int]:
    return front_end(name, ["--generator", f"ray:{app}", "--store", "env:KLEIN_BENCH_DSN"], env, scratch)


async def call(client: Any, tool: str, arguments: dict[str, Any]) -> Any:
    made = await client.call_tool(tool, arguments)
    if made.is_error:
        raise RuntimeError(f"{tool} failed: {made.content[0].text}")
    return made


async def recipe_of(client: Any, image_id: str) -> dict[str, Any]:
    contents = (await client.read_resource(f"image://{image_id}/meta")).contents
    recipe: dict[str, Any] = json.loads(contents[0].text)["recipe"]
    return recipe


def p50_p95(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 1), "p95": round(percentile(values, 95), 1)}


async def latencies(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """One client, `generate` calls one at a time: the round trip less the model time the generator measured
    (`timings_ms.total`), split at the engine's wall time around the generator call (`model_ms`)."""
    from mcp import Client

    from tests.http_helpers import authed

    generate = {
        "prompt": "a kite over the dunes",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
    }
    added, hop, rest, inside, made = [], [], [], [], []
    async with Client(authed(port, TOKEN)) as client:
        for k in range(3):  # warm-up: connections, pools, caches
            await call(client, "generate", {**generate, "seed": k})
        for k in range(args.latency_calls):
            start = time.perf_counter()
            result = await call(client, "generate", {**generate, "seed": 100 + k})
            round_trip_ms = (time.perf_counter() - start) * 1000
            image_id = result.structured_content["images"][0]["image_id"]
            recipe = await recipe_of(client, image_id)
            model_ms, engine_ms = recipe["timings_ms"]["total"], recipe["model_ms"]
            added.append(round_trip_ms - model_ms)
            hop.append(engine_ms - model_ms)
            rest.append(round_trip_ms - engine_ms)
            # the front-end's own span (Studio.make: checks, engine, Ray, PNG, store; whole ms), without the
            # client's MCP round trip to it
            inside.append(result.structured_content["elapsed_ms"] - model_ms)
            made.append(image_id)
    return {
        "added_ms": p50_p95(added),
        "ray_hop_ms": p50_p95(hop),
        "front_end_and_store_ms": p50_p95(rest),
        "front_end_to_store_ms": p50_p95(inside),
        "image_ids": made,
    }


async def retry_hits(args: argparse.Namespace, ports: list[int], references: list[str]) -> dict[str, int]:
    """`edit` on each reference, then `--retries` retries, each at the other front-end than the last; a retry is a
    hit when the replica reports reference latents from its cache."""
    from mcp import Client

    from tests.http_helpers import authed

    hits = retries = first_hits = first_retries = 0
    async with Client(authed(ports[0], TOKEN)) as first, Client(authed(ports[1], TOKEN)) as second:
        clients = [first, second]
        for attempt in range(args.retries + 1):
            for j, image_id in enumerate(references):
                edit = {
                    "image": image_id,
                    "prompt": "the same, at night",
                    "seed": attempt,
                    "steps": args.steps,
                }
                made = await call(clients[(attempt + j) % 2], "edit", edit)
                hit = int(made.structured_content["cache_hits"].get("references", 0) > 0)
                if attempt > 0:
                    retries, hits = retries + 1, hits + hit
                if attempt == 1:
                    first_retries, first_hits = first_retries + 1, first_hits + hit
    return {"retries": retries, "hits": hits, "first_retries": first_retries, "first_hits": first_hits}


def front_end_figures(args: argparse.Namespace, env: dict[str, str], scratch: Path) -> dict[str, Any]:
    """The latency through a Ray front-end on the shared store, the embedded server's for comparison (its
    model in-process, its store a folder), and the retries' cache hits across two Ray front-ends."""
    import anyio

    with front_end(
        "embedded", ["--model", "tiny", "--store", str(scratch / "embedded")], env, scratch
    ) as port:
        embedded = anyio.run(latencies, args, port)
    with (
        ray_front_end("fe1", "bench-2", env, scratch) as one,
        ray_front_end("fe2", "bench-2", env, scratch) as two,
    ):
        scaled = anyio.run(latencies, args, one)
        hits = anyio.run(retry_hits, args, [one, two], scaled["image_ids"][: args.references])
    del embedded["image_ids"], scaled["image_ids"]
    return {**scaled, **hits, "embedded": embedded}


# ---- the store alone ----------------------------------------------------------------------------------------------


def store_writes(
    args: argparse.Namespace, dsn: str, blobs: str, endpoint: str, scratch: Path
) -> dict[str, Any]:
    from bench_store import png_256, put_rates

    from klein_agent.service.store.open import open_store

    png = png_256()
    total = (args.puts * 5 + 20) * 2
    rows = {}
    with open_store(
        dsn,
        blobs,
        root=scratch / "store-bench",
        s3_endpoint=endpoint,
        max_images=total,
        max_bytes=total * len(png),
    ) as store:
        for threads in (1, 4):
            rows[threads] = spread(put_rates(store, png, puts=args.puts, runs=5, warmup=20, threads=threads))
    return {"png_bytes": len(png), "one_thread": rows[1], "four_threads": rows[4]}


# ---- the run ------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests import store_servers
    from tests.ray_cluster import ray_cluster

    admin = os.environ[store_servers.PG_ADMIN_ENV]
    endpoint = os.environ[store_servers.S3_ENDPOINT_ENV]
    # one torch thread in every process (the cluster's workers inherit it): a replica is one core, as a GPU is one
    # GPU, so 2 replicas can be twice 1 on 2 cores; Ray would set it for a 1-CPU replica too, this makes it sure
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="klein-bench-scale-") as folder, ray_cluster() as cluster:
        scratch = Path(folder)
        env = {
            **cluster,
            **store_servers.s3_environment(endpoint),
            "PYTHONPATH": str(REPO),
            "KLEIN_BENCH_DSN": store_servers.database_for(admin, "scale"),
            "KLEIN_AGENT_BLOBS": f"s3://{store_servers.S3_BUCKET}/scale",
            "KLEIN_AGENT_TOKEN": TOKEN,
            "XDG_DATA_HOME": str(scratch / "data"),
        }
        os.environ.update(env)  # this process is a front-end too (RayGenerator) and a store client
        figures: dict[str, Any] = {"size": args.size, "steps": args.steps, "cpus": os.cpu_count()}
        figures["load_before"] = round(os.getloadavg()[0], 1)  # a shared machine: how busy it was
        try:
            step("replicas: 1 vs 2", lambda: figures.update(replicas=replica_scaling(args, env)))
            step(
                "front-ends: latency, cache hits",
                lambda: figures.update(calls=front_end_figures(args, env, scratch)),
            )
        except BaseException:
            # said here: leaving the block stops the cluster, and a driver whose raylet dies exits at once,
            # before any traceback is printed
            traceback.print_exc()
            raise
        finally:
            import ray

            ray.shutdown()  # before the cluster stops, for the same reason
        dsn, blobs = store_servers.database_for(admin, "store_alone"), f"s3://{store_servers.S3_BUCKET}/alone"
        step("store alone", lambda: figures.update(store=store_writes(args, dsn, blobs, endpoint, scratch)))
    figures["load_after"] = round(os.getloadavg()[0], 1)
    return figures


def step(what: str, do: Callable[[], object]) -> None:
    start = time.perf_counter()
    print(f"{what} ...", file=sys.stderr, flush=True)
    do()
    print(f"{what}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def table(f: dict[str, Any]) -> str:
    r, c, s = f["replicas"], f["calls"], f["store"]

    def rng(d: dict[str, float], unit: str = "") -> str:
        return f"{d['median']:.2f}{unit} ({d['min']:.2f}–{d['max']:.2f})"

    rows = [
        ("images/s, 1 replica", rng(r["one"], "/s")),
        ("images/s, 2 replicas", rng(r["two"], "/s")),
        ("2 replicas / 1 replica", rng(r["ratio"], "×")),
        (
            "one front-end's engine, images/s, 1 / 2 replicas",
            f"{rng(r['engine_one'], '/s')} / {rng(r['engine_two'], '/s')}",
        ),
        ("  2 replicas / 1 replica, one engine", rng(r["engine_ratio"], "×")),
        (
            "  model time per call, 1 / 2 replicas",
            f"{r['model_ms_one']:.0f} / {r['model_ms_two']:.0f} ms (median)",
        ),
        (
            "  images/s ÷ (replicas / model time)",
            f"{100 * r['efficiency_one']:.0f} % / {100 * r['efficiency_two']:.0f} %",
        ),
        ("added latency per call (p50 / p95)", f"{c['added_ms']['p50']:.1f} / {c['added_ms']['p95']:.1f} ms"),
        ("  of which the Ray hop", f"{c['ray_hop_ms']['p50']:.1f} / {c['ray_hop_ms']['p95']:.1f} ms"),
        (
            "  of which MCP, front-end and store",
            f"{c['front_end_and_store_ms']['p50']:.1f} / {c['front_end_and_store_ms']['p95']:.1f} ms",
        ),
        (
            "front-end → replica → store (the call's span there)",
            f"{c['front_end_to_store_ms']['p50']:.1f} / {c['front_end_to_store_ms']['p95']:.1f} ms",
        ),
        (
            "the embedded server's, for comparison",
            f"{c['embedded']['added_ms']['p50']:.1f} / {c['embedded']['added_ms']['p95']:.1f} ms; its span "
            f"{c['embedded']['front_end_to_store_ms']['p50']:.1f} / {c['embedded']['front_end_to_store_ms']['p95']:.1f} ms",
        ),
        (
            "cache hits of retries",
            f"{c['hits']}/{c['retries']} ({100 * c['hits'] / max(c['retries'], 1):.0f} %)",
        ),
        ("  of first retries", f"{c['first_hits']}/{c['first_retries']}"),
        ("PostgreSQL + S3 writes/s, 1 thread", rng(s["one_thread"], "/s")),
        ("PostgreSQL + S3 writes/s, 4 threads", rng(s["four_threads"], "/s")),
    ]
    width = max(len(name) for name, _ in rows)
    head = (
        f"tiny model, {f['size']}x{f['size']}, {f['steps']} steps, {f['cpus']} CPUs (1-minute load average "
        f"{f['load_before']} before, {f['load_after']} after); median (min–max)"
    )
    return "\n".join([head, *(f"{name.ljust(width)}  {value}" for name, value in rows)])


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    from tests import store_servers

    if not store_servers.in_private_network():
        why = (
            store_servers.unshare_missing()
            or store_servers.postgres_missing()
            or store_servers.weed_missing()
        )
        if why:
            print(
                f"bench_scale runs in a loopback-only namespace with its own servers: {why}", file=sys.stderr
            )
            return 2
        command = store_servers.private_network_command(str(Path(__file__).resolve()), "--contained", *raw)
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
        return subprocess.run(command, cwd=REPO, env=env).returncode
    figures = run(args)
    print(table(figures), flush=True)
    print(json.dumps(figures), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
