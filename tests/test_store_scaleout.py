"""The store's shared backends (PostgreSQL + S3) under the same interface tests as the embedded store, with real
servers, contained: a child pytest runs inside its own network namespace (loopback only) with PostgreSQL 15 and
SeaweedFS started there (tests/store_servers.py), so no test traffic can leave the machine.

Without the rights to make a namespace (or without PostgreSQL 15 or `weed`) the test skips saying why; in CI
(CI=true) it fails instead, so the backends are never silently untested there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import store_servers

REPO = Path(__file__).resolve().parents[1]
# The files whose tests the child runs with the shared backends (each parametrized over tests/store_backends.py).
SHARED_BACKEND_TESTS = [
    "tests/test_store_interfaces.py",
    "tests/test_call_keys.py",
    "tests/test_store_shared.py",
    "tests/test_store_shared_e2e.py",
]


def missing_part() -> str | None:
    """Why the contained servers cannot run here, or None."""
    return store_servers.unshare_missing() or store_servers.postgres_missing() or store_servers.weed_missing()


def run_contained(*pytest_args: str, timeout_s: float = 240) -> None:
    """Run pytest with `pytest_args` in the private network with the servers (`store_servers.run_contained_pytest`)."""
    store_servers.run_contained_pytest(
        "PostgreSQL + S3 store tests",
        missing_part(),
        store_servers.private_network_command("-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout_s=timeout_s,
    )


def test_the_store_interfaces_hold_over_postgresql_and_s3() -> None:
    run_contained(*SHARED_BACKEND_TESTS, "-k", "postgresql+s3 or test_store_shared")


def test_two_front_ends_on_postgresql_and_s3_survive_a_kill_and_any_routing() -> None:
    """tests/test_front_ends.py over the shared store: its own run, as it starts four front-ends."""
    run_contained("tests/test_front_ends.py", "-k", "postgresql+s3", timeout_s=420)


def test_without_containment_it_skips_with_the_reason_and_ci_fails_instead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_servers, "unshare_missing", lambda: "`unshare -n` is not allowed here (test)")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"not allowed here \(test\) \(CI must run them\)"):
        run_contained("tests/test_store_interfaces.py")
    monkeypatch.delenv("CI")
    with pytest.raises(
        pytest.skip.Exception, match=r"loopback-only network namespace: `unshare -n` is not allowed"
    ):
        run_contained("tests/test_store_interfaces.py")
