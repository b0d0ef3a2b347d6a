"""A throwaway local Ray cluster for the replica tests, contained like the store's servers (tests/store_servers.py):
it starts only inside a network + PID namespace with loopback alone (`unshare -n -p -f --mount-proc`), because Ray
Serve replicas bind their gRPC server on every interface and Ray probes 8.8.8.8 for its address; usage stats are
off, and token auth is on with a fresh token that every process (ray start, deploy, serve) gets from the
environment. HOME and Ray's temp folder are private, so nothing is shared with another Ray on the machine, and
`ray stop` inside the PID namespace sees only this cluster.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests import store_servers

RAY_PORT = 6390
TEMP_ENV = "KLEIN_TEST_RAY_TEMP"  # the cluster's temp folder (its logs), for tests that read them


def ray_missing() -> str | None:
    """Why a local Ray cluster cannot start here, or None."""
    if not Path(sys.executable).with_name("ray").is_file():
        return "`ray` is not installed (pip install 'ray[serve]==2.60.0', part of the test extra)"
    return None


def private_network_command(*argv: str) -> list[str]:
    """The command line that runs `python argv...` in a new network, PID and mount namespace, loopback up."""
    script = 'ip link set lo up && exec "$0" "$@"'
    return ["unshare", "-n", "-p", "-f", "--mount-proc", "--", "sh", "-c", script, sys.executable, *argv]


@contextlib.contextmanager
def ray_cluster(cpus: int = 4) -> Iterator[dict[str, str]]:
    """`ray start --head` on 127.0.0.1 with `cpus` logical CPUs; yields the environment a process needs to use it
    (RAY_ADDRESS, the token, usage stats off; TEMP_ENV: its temp folder). Refuses to start outside the private network namespace."""
    if not store_servers.in_private_network():
        raise RuntimeError("Ray starts only inside the loopback-only namespace (see tests/ray_cluster.py)")
    folder = Path(tempfile.mkdtemp(prefix="kr-"))  # short: Ray's unix socket paths live below it
    (folder / "home").mkdir()
    env = {
        **os.environ,
        "HOME": str(folder / "home"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1",  # 2 loaded cores: the router's probes are slow
        "RAY_ADDRESS": f"127.0.0.1:{RAY_PORT}",
        TEMP_ENV: str(folder / "ray"),
    }
    ray = str(Path(sys.executable).with_name("ray"))
    head = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={RAY_PORT}", f"--num-cpus={cpus}"]
    head += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={folder / 'ray'}"]
    try:
        started = subprocess.run([ray, *head], env=env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{(started.stdout + started.stderr)[-3000:]}")
        yield env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def replica_calls(env: dict[str, str], app: str, method: str = "generate") -> dict[str, int]:
    """Calls of `method` each replica of `app` has finished, by replica log file, from Serve's access log lines
    ("CALL generate OK 12.3ms", written at once: the request-path log buffer is 1 line by default)."""
    return replica_log_lines(env, app, f"CALL {method} ")


def replica_log_lines(env: dict[str, str], app: str, text: str) -> dict[str, int]:
    """Lines holding `text` in each replica log file of `app` (Serve's lines and ours: `logs.forward_ours`)."""
    logs = Path(env[TEMP_ENV]) / "session_latest" / "logs" / "serve"
    return {
        path.name: sum(text in line for line in path.read_text(errors="replace").splitlines())
        for path in sorted(logs.glob(f"replica_{app}_*.log"))
    }
