"""Generator replicas on a real local Ray cluster, contained: a child pytest runs tests/test_replica_e2e.py inside
its own network and PID namespace with loopback only (tests/ray_cluster.py), so neither Ray's replicas (bound on
every interface) nor its address probe can reach beyond this machine, and everything it started dies with it.

Without the rights to make a namespace (or without Ray) the test skips saying why; in CI (CI=true) it fails
instead, so the replicas are never silently untested there.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests import ray_cluster, store_servers
from tests.http_helpers import REPO


def missing_part() -> str | None:
    """Why the contained cluster cannot run here, or None."""
    return store_servers.unshare_missing() or ray_cluster.ray_missing()


def run_contained(*pytest_args: str, timeout_s: float = 300) -> None:
    """Run pytest with `pytest_args` in the private network; fail with its output unless it passes. Skips (fails
    under CI=true) when this machine cannot contain a Ray cluster."""
    why = missing_part()
    if why is not None:
        message = f"Ray replica tests need a loopback-only network namespace: {why}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI must run them)")
        pytest.skip(message)
    command = ray_cluster.private_network_command(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        store_servers.NETNS_ENV: "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"the contained replica tests failed:\n{output}"
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, (
        f"inside the namespace nothing may skip:\n{output}"
    )


def test_two_ray_replicas_behind_serve_give_the_same_pictures_with_progress() -> None:
    run_contained("tests/test_replica_e2e.py")


def test_without_containment_it_skips_with_the_reason_and_ci_fails_instead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_servers, "unshare_missing", lambda: "`unshare -n` is not allowed here (test)")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"not allowed here \(test\) \(CI must run them\)"):
        run_contained("tests/test_replica_e2e.py")
    monkeypatch.delenv("CI")
    with pytest.raises(
        pytest.skip.Exception, match=r"Ray replica tests need a loopback-only network namespace"
    ):
        run_contained("tests/test_replica_e2e.py")
