"""tools/bench_scale.py runs end to end with tiny counts (`--quick`): its own contained PostgreSQL, SeaweedFS and Ray
cluster, two deployed applications, two front-ends without --model, a real MCP client, and every figure of its
table measured. No timing is asserted (that is the bench's job, not a test's): only that each figure was measured
from real calls. Where no loopback-only namespace can be made it skips saying why, and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ray_cluster, store_servers
from tests.http_helpers import REPO


@pytest.mark.slow
def test_the_scale_bench_measures_every_figure_with_tiny_counts(tmp_path: Path) -> None:
    missing = (
        store_servers.unshare_missing()
        or store_servers.postgres_missing()
        or store_servers.weed_missing()
        or ray_cluster.ray_missing()
    )
    if missing is not None:
        message = f"the scale bench needs a loopback-only namespace and its servers: {missing}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI must run it)")
        pytest.skip(message)
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_scale.py"), "--quick", "--json", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    figures = json.loads(out.read_text())
    replicas, calls, store = figures["replicas"], figures["calls"], figures["store"]
    assert replicas["one"]["median"] > 0 and replicas["two"]["median"] > 0
    assert replicas["ratio"]["median"] == pytest.approx(
        replicas["two"]["median"] / replicas["one"]["median"], 1e-2
    )
    # the added latency is the round trip less the replica's own model time: positive, and its two parts add up
    added, hop, rest = (
        calls["added_ms"]["p50"],
        calls["ray_hop_ms"]["p50"],
        calls["front_end_and_store_ms"]["p50"],
    )
    assert added > 0 and hop > 0 and rest > 0
    assert calls["retries"] == 1 and calls["hits"] in (0, 1), "one reference, one retry (--quick)"
    assert store["one_thread"]["median"] > 0 and store["four_threads"]["median"] > 0
    assert "2 replicas / 1 replica" in done.stdout and "cache hits of retries" in done.stdout
