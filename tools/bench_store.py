"""Writes per second of the image store alone (no model): `ImageStore.put` of one PNG, blob first, row second,
for the embedded store (SQLite + a folder) and the shared one (PostgreSQL + S3), with 1 and N writer threads.

    python tools/bench_store.py --contained            # both, PostgreSQL 15 + SeaweedFS started for the run
    python tools/bench_store.py --store postgresql://… --blobs s3://BUCKET/PREFIX --s3-endpoint URL
                                                       # your own servers (AWS_* keys from the environment)

`--contained` re-runs this script inside a loopback-only network namespace with throwaway servers
(tests/store_servers.py: PostgreSQL on a unix socket with fsync off, `weed mini` on 127.0.0.1), so the figures are
those of the store code and the protocol round trips, not of a durable disk; the embedded store runs with its
real fsyncs. Each configuration is warmed up (`--warmup` puts, not timed), then timed `--runs` times over
`--puts` puts each; the median of the runs is reported, with min and max. The PNG is a 256×256 picture of random
pixels (~197 KB, the size of an incompressible 256² picture; real pictures compress better, so smaller).
Quotas are set above what a run writes, so no eviction happens in the timed part. Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from klein_agent.service.store import ImageStore  # noqa: E402
from klein_agent.service.store.open import open_store  # noqa: E402


def png_256() -> bytes:
    """A 256×256 RGB PNG of random pixels (seeded): what one small picture costs the store."""
    import random

    from PIL import Image

    rng = random.Random(0)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (256, 256), rng.randbytes(256 * 256 * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def timed_puts(store: ImageStore, png: bytes, puts: int, threads: int) -> float:
    """Seconds for `puts` puts spread over `threads` threads."""
    per_thread = [puts // threads + (1 if i < puts % threads else 0) for i in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def work(n: int) -> None:
        barrier.wait()
        for _ in range(n):
            store.put(png, width=256, height=256, recipe={"tool": "bench"})

    pool = [threading.Thread(target=work, args=(n,)) for n in per_thread]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - start


def put_rates(
    store: ImageStore, png: bytes, *, puts: int, runs: int, warmup: int, threads: int
) -> list[float]:
    """Puts per second of `runs` timed runs of `puts` puts over `threads` threads, after `warmup` untimed puts
    (also used by tools/bench_scale.py)."""
    timed_puts(store, png, warmup, threads)
    return [puts / timed_puts(store, png, puts, threads) for _ in range(runs)]


def bench(name: str, store: ImageStore, args: argparse.Namespace, png: bytes) -> None:
    for threads in args.threads:
        rates = put_rates(store, png, puts=args.puts, runs=args.runs, warmup=args.warmup, threads=threads)
        row = {
            "store": name,
            "threads": threads,
            "puts_per_run": args.puts,
            "runs": args.runs,
            "png_bytes": len(png),
            "writes_per_s_median": round(statistics.median(rates), 1),
            "min": round(min(rates), 1),
            "max": round(max(rates), 1),
        }
        print(json.dumps(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--contained", action="store_true", help="start throwaway servers in a private network"
    )
    parser.add_argument("--store", help="a postgresql:// URL (with --blobs) to measure your own servers")
    parser.add_argument("--blobs", help="s3://BUCKET/PREFIX for --store")
    parser.add_argument("--s3-endpoint", help="an S3-compatible server (else $AWS_ENDPOINT_URL)")
    parser.add_argument("--puts", type=int, default=200, help="puts per timed run (default 200)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed puts before each row (default 20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="writer threads (default 1 4)")
    parser.add_argument("--skip-embedded", action="store_true", help="measure only the shared store")
    args = parser.parse_args()
    if args.contained and os.environ.get("KLEIN_TEST_PRIVATE_NETWORK") != "1":
        from tests.store_servers import private_network_command

        argv = [a for a in sys.argv[1:] if a != "--contained"]
        command = private_network_command(str(Path(__file__).resolve()), "--contained", *argv)
        return subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).returncode

    png = png_256()
    total = args.puts * args.runs * len(args.threads) + args.warmup * len(args.threads)
    bounds = {"max_images": total + 1, "max_bytes": (total + 1) * len(png)}
    with tempfile.TemporaryDirectory(prefix="klein-bench-store-") as scratch:
        if not args.skip_embedded:
            with ImageStore(Path(scratch) / "embedded", **bounds) as store:
                bench("sqlite+folder", store, args, png)
        dsn, blobs, endpoint = args.store, args.blobs, args.s3_endpoint
        if args.contained:  # inside the namespace: the servers tests/store_servers.py started
            from tests import store_servers

            dsn = store_servers.database_for(os.environ[store_servers.PG_ADMIN_ENV], "bench")
            blobs, endpoint = (
                f"s3://{store_servers.S3_BUCKET}/bench",
                os.environ[store_servers.S3_ENDPOINT_ENV],
            )
            os.environ.update(store_servers.s3_environment(endpoint))
        if dsn:
            with open_store(
                dsn, blobs, root=Path(scratch) / "shared", s3_endpoint=endpoint, **bounds
            ) as store:
                bench("postgresql+s3", store, args, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
