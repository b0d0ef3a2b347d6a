"""Generator replicas on a real local Ray cluster, contained: a child pytest runs tests/test_replica_e2e.py inside
its own network and PID namespace with loopback only (tests/ray_cluster.py), so neither Ray's replicas (bound on
every interface) nor its address probe can reach beyond this machine, and everything it started dies with it.

Without the rights to make a namespace (or without Ray) the test skips saying why; in CI (CI=true) it fails
instead, so the replicas are never silently untested there.
"""

from __future__ import annotations

import os

import pytest

from tests import ray_cluster, store_servers
from tests.http_helpers import REPO


def missing_part() -> str | None:
    """Why the contained cluster cannot run here, or None."""
    return store_servers.unshare_missing() or ray_cluster.ray_missing()


def run_contained(*pytest_args: str, timeout_s: float = 300) -> None:
    """Run pytest with `pytest_args` in the private network (`store_servers.run_contained_pytest`), Ray's usage
    stats off; print the figures it measured (its lines with "measured:")."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        store_servers.NETNS_ENV: "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    said = store_servers.run_contained_pytest(
        "Ray replica tests",
        missing_part(),
        ray_cluster.private_network_command(
            "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *pytest_args
        ),
        env=env,
        timeout_s=timeout_s,
    )
    for line in said.splitlines():
        if "measured:" in line:  # after pytest's progress dots, when on the same line
            print(line[line.index("measured:") :])


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
