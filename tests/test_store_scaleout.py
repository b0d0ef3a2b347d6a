"""The store's shared backends (PostgreSQL + S3) under the same interface tests as the embedded store, with real
servers, contained: a child pytest runs inside its own network namespace (loopback only) with PostgreSQL 15 and
SeaweedFS started there (tests/store_servers.py), so no test traffic can leave the machine.

Without the rights to make a namespace (or without PostgreSQL 15 or `weed`) the test skips saying why; in CI
(CI=true) it fails instead, so the backends are never silently untested there.
"""

from __future__ import annotations

import os
import subprocess
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


# Run in each of two contained runs at once: put a key of its own when both are up, list the bucket when both have
# put, and print what it saw. Markers in a shared folder (argv[1]) line the two up; argv[2] names this run.
TWO_RUNS_CHILD = """
import os, sys, time
from pathlib import Path
import obstore
from obstore.store import S3Store
from tests import store_servers as s
meet, me = Path(sys.argv[1]), sys.argv[2]
def wait_for(name):
    deadline = time.monotonic() + 120
    while not all((meet / f"{run}.{name}").exists() for run in ("a", "b")):
        assert time.monotonic() < deadline, f"the other run never got to {name}"
        time.sleep(0.1)
endpoint = os.environ[s.S3_ENDPOINT_ENV]
store = S3Store(s.S3_BUCKET, config={"endpoint": endpoint, "access_key_id": s.S3_KEY,
    "secret_access_key": s.S3_SECRET, "region": "us-east-1"}, client_options={"allow_http": True})
(meet / f"{me}.up").touch(); wait_for("up")
obstore.put(store, f"only-{me}", me.encode(), mode="create")
(meet / f"{me}.put").touch(); wait_for("put")
print("SAW", sorted(m["path"] for chunk in obstore.list(store) for m in chunk))
"""


def test_two_contained_runs_at_once_each_have_their_own_s3(tmp_path: Path) -> None:
    # weed's unix sockets sit at fixed paths in /tmp, which network namespaces share: two runs at once (engineers,
    # CI jobs) once reached each other's servers and failed PUTs with "volume 3 not found" (tests/store_servers.py)
    why = missing_part()
    if why is not None:
        pytest.skip(f"needs the contained servers: {why}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {
        me: subprocess.Popen(
            store_servers.private_network_command("-c", TWO_RUNS_CHILD, str(tmp_path), me),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for me in ("a", "b")
    }
    for me, run in runs.items():
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out[-3000:]
        assert f"SAW ['only-{me}']" in out, out[-3000:]
