"""Generator replicas as a user runs them: a local Ray cluster (token auth on, usage stats off), `klein-agent
deploy --model tiny --replicas 2`, then two front-ends `klein-agent serve --http --generator ray:APP` and real MCP
clients. The PNG bytes equal those of the single-process server (`serve --model tiny`) for the same recipe, and
the replica's per-step progress reaches the client; a retry on the same references finds them prepared on the
replica it reaches from either front-end (the hit rate is measured and printed); a client's cancel stops the
replica's model at its next step; a replica process killed mid-call costs the client nothing (one retry on the
other, stored once) and Serve replaces it.

Runs in the contained child pytest of tests/test_replica_scaleout.py (loopback-only namespace); skipped with the
reason when run outside it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from PIL import Image

from klein_agent.rules import limits
from tests import store_servers
from tests.http_helpers import REPO, authed, http_server
from tests.ray_cluster import ray_cluster, replica_calls, replica_log_lines

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not store_servers.in_private_network(),
        reason="needs the contained Ray cluster: tests/test_replica_scaleout.py runs this file with it",
    ),
]
APP = "klein-e2e"
RECIPE = {"prompt": "a red kite over the dunes", "width": 80, "height": 64, "seed": 7, "steps": 4}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    with ray_cluster() as env:
        yield env


@pytest.fixture(scope="module")
def deployed(cluster: dict[str, str]) -> str:
    """`klein-agent deploy --model tiny --replicas 2 --app APP` on the cluster, once: its output."""
    deploy = ["-m", "klein_agent", "deploy", "--model", "tiny", "--replicas", "2", "--app", APP]
    env = {**cluster, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, *deploy], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def front_ends(
    cluster: dict[str, str], deployed: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[tuple[Path, int, str | None]]]:
    """Two `serve --http --generator ray:APP` front-ends, each with its own store: [(folder, port, token)]."""
    env = {**cluster, "PYTHONPATH": str(REPO)}
    with contextlib.ExitStack() as stack:
        running = []
        for name in ("a", "b"):
            folder = tmp_path_factory.mktemp(f"front-end-{name}")
            # no --model: a front-end takes the application's model and needs no weights of its own
            _, port, token = stack.enter_context(
                http_server(folder, folder / "store", "--generator", f"ray:{APP}", env=env, model=None)
            )
            running.append((folder, port, token))
        yield running


async def make_png(port: int, token: str | None) -> tuple[bytes, list[str]]:
    """One `generate` call of RECIPE: the stored PNG's bytes and the progress messages heard."""
    heard: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        heard.append(message or "")

    async with Client(authed(port, token)) as client:
        made = await client.call_tool("generate", RECIPE, progress_callback=on_progress)
        assert not made.is_error, made
        image_id = made.structured_content["images"][0]["image_id"]
        resource: Any = (await client.read_resource(f"image://{image_id}")).contents[0]
    return base64.b64decode(resource.blob), heard


def test_a_client_without_the_clusters_token_is_refused(cluster: dict[str, str]) -> None:
    env = {k: v for k, v in cluster.items() if k != "RAY_AUTH_TOKEN"}
    probe = "import ray; ray.init(address='" + cluster["RAY_ADDRESS"] + "', log_to_driver=False)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "token" in done.stderr.lower(), done.stderr[-2000:]


async def test_two_replicas_give_the_single_process_servers_png_bytes_and_stream_progress(
    tmp_path: Path, cluster: dict[str, str], deployed: str, front_ends: list[tuple[Path, int, str | None]]
) -> None:
    assert f"application '{APP}' on {cluster['RAY_ADDRESS']}: 2 replica(s) running tiny" in deployed, (
        deployed[-2000:]
    )
    assert cluster["RAY_AUTH_TOKEN"] not in deployed, "the Ray token in deploy's output"
    folder, port, token = front_ends[0]
    remote_png, remote_heard = await make_png(port, token)
    log = (folder / "server.log").read_text()
    assert f"generator: Ray application '{APP}'" in log, log[-2000:]
    assert cluster["RAY_AUTH_TOKEN"] not in log, "the Ray token in the front-end's log"
    (tmp_path / "local").mkdir()
    with http_server(tmp_path / "local", tmp_path / "local" / "store") as (_, port, token):
        local_png, local_heard = await make_png(port, token)

    assert remote_png[:8] == b"\x89PNG\r\n\x1a\n" and remote_png == local_png, "the same PNG bytes"
    steps = [m for m in remote_heard if m.startswith("step ")]
    assert steps == [f"step {k}/4" for k in range(1, 5)], remote_heard
    assert remote_heard[-1] == local_heard[-1], (remote_heard, local_heard)


def reference_uri(k: int, side: int = 64) -> str:
    """A side x side PNG data URI, different for each k."""
    picture = Image.new("RGB", (side, side), (40 * k % 256, 255 - 30 * k % 256, 90))
    picture.putpixel((k, k), (0, 0, 0))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


async def reference_hits(port: int, token: str | None, k: int) -> int:
    """One `edit` of reference k: how many references the replica found prepared (its `cache_hits`)."""
    args = {"image": reference_uri(k), "prompt": "the same at night", "width": 64, "height": 64, "seed": k}
    async with Client(authed(port, token)) as client:
        made = await client.call_tool("edit", {**args, "steps": 2})
    assert not made.is_error, made
    hits: int = made.structured_content["cache_hits"].get("references", 0)
    return hits


async def test_a_retry_on_the_same_references_finds_them_prepared_from_either_front_end(
    cluster: dict[str, str], front_ends: list[tuple[Path, int, str | None]]
) -> None:
    """Each reference is edited through front-end A, then retried through B and through A again. The replica
    reports a cache hit when it has the reference prepared. The references themselves spread over both replicas
    (else every retry would hit on the one replica there is): with calls spread at random, about half of the
    first retries would miss."""
    (_, port_a, token_a), (_, port_b, token_b) = front_ends
    before = replica_calls(cluster, APP)
    references = 10  # ten keys all on one replica of two: p = 2 / 2**10
    retries = hits = 0
    for k in range(references):
        await reference_hits(port_a, token_a, k)  # the first sight: prepared on the replica it routes to
        for port, token in ((port_b, token_b), (port_a, token_a)):
            retries += 1
            hits += await reference_hits(port, token, k) > 0
    served = {name: n - before.get(name, 0) for name, n in replica_calls(cluster, APP).items()}
    rate = hits / retries
    print(
        f"measured: cache-hit rate of retries on the same references, 2 replicas, 2 front-ends: {rate:.0%} "
        f"({hits}/{retries}; calls per replica {sorted(served.values())})"
    )
    assert sum(served.values()) == 3 * references and all(served.values()) and len(served) == 2, served
    assert rate >= 0.9, f"{hits}/{retries} retries found their reference prepared"


def replica_pids() -> set[int]:
    """The process ids of APP's replicas (Ray titles them ray::ServeReplica:APP:DEPLOYMENT)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if f"ServeReplica:{APP}:".encode() in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
    return found


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of `pid`, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def image_count(port: int, token: str | None) -> int:
    async with Client(authed(port, token)) as client:
        listed = await client.call_tool("list_images", {"limit": 100})
    assert not listed.is_error, listed
    return len(listed.structured_content["images"])


STOPPED = "its caller cancelled it; stopped at step"  # the replica's line for a call its caller cancelled


def long_call(seed: int) -> dict[str, Any]:
    """A call of the most steps: long enough on any machine to be stopped well before its end."""
    return {"prompt": "a long call", "width": 384, "height": 384, "seed": seed, "steps": limits.MAX_STEPS}


class Steps:
    """A progress callback that notes when each step was heard, and an event once three were."""

    def __init__(self) -> None:
        self.heard: list[float] = []
        self.three = anyio.Event()

    async def on_progress(self, value: float, total: float | None, message: str | None) -> None:
        if (message or "").startswith("step "):
            self.heard.append(time.monotonic())
            if len(self.heard) == 3:
                self.three.set()

    def remaining_s(self) -> float:
        """How long the model still had to run after the third step, at the pace of the first three."""
        return (limits.MAX_STEPS - 3) * (self.heard[2] - self.heard[0]) / 2


class StopWatch(threading.Thread):
    """Polls the replicas' stop lines from the moment it starts, in a thread of its own, so the teardown around a
    killed front-end neither cancels nor delays it. `seconds`, once it has ended: from its start until the
    replicas of APP logged one more stop than before it started, or 60 s if none came."""

    def __init__(self, cluster: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stops_before = stops(cluster)
        self.seconds: float | None = None

    def run(self) -> None:
        since = time.monotonic()
        while stops(self.cluster) == self.stops_before and time.monotonic() < since + 60:
            time.sleep(0.05)
        self.seconds = time.monotonic() - since


def assert_stopped_at_the_next_step(watch: StopWatch, steps: Steps) -> float:
    """One stop logged, in under half of what the model had left to run (a step and the hops of the cancel,
    against ~97 steps); returns its seconds."""
    assert len(steps.heard) >= 3, f"the call never reached its third step: {steps.heard}"
    watch.join(timeout=90)
    logged = stops(watch.cluster) - watch.stops_before
    assert logged == 1 and watch.seconds is not None, (
        f"{logged} stops logged",
        replica_calls(watch.cluster, APP),
    )
    assert watch.seconds < 0.5 * steps.remaining_s(), (watch.seconds, steps.remaining_s())
    return watch.seconds


def stops(cluster: dict[str, str]) -> int:
    """The stops of cancelled calls the replicas of APP have logged."""
    return sum(replica_log_lines(cluster, APP, STOPPED).values())


async def test_a_replica_killed_mid_call_costs_the_client_nothing_and_is_replaced(
    front_ends: list[tuple[Path, int, str | None]],
) -> None:
    folder, port, token = front_ends[0]
    before = await image_count(port, token)
    pids = replica_pids()
    assert len(pids) == 2, pids
    started = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        if (message or "").startswith("step "):
            started.set()

    # long enough to be killed mid-way after the CPU sample below (a call that ended first fails the log
    # assertion, not silently)
    async with Client(authed(port, token)) as client, anyio.create_task_group() as tasks:
        result: list[Any] = []

        async def call() -> None:
            result.append(await client.call_tool("generate", long_call(3), progress_callback=on_progress))

        tasks.start_soon(call)
        with anyio.fail_after(120):
            await started.wait()
        first = {pid: cpu_ticks(pid) for pid in pids}
        await anyio.sleep(0.3)
        busy = max(pids, key=lambda pid: cpu_ticks(pid) - first[pid])  # the one running the call burns CPU
        os.kill(busy, signal.SIGKILL)
    (made,) = result
    assert not made.is_error, made
    assert made.structured_content["steps"] == limits.MAX_STEPS
    log = (folder / "server.log").read_text()
    assert "its replica died mid-call" in log and "retrying once on another" in log, log[-3000:]
    assert await image_count(port, token) == before + 1, "stored once"

    deadline = time.monotonic() + 90  # Serve replaces the replica (11 s in the notes, on an idle machine)
    while not (len(now := replica_pids()) == 2 and busy not in now) and time.monotonic() < deadline:
        await anyio.sleep(0.5)
    assert len(now) == 2 and busy not in now, f"no replacement replica: {now}"
    for port, token in ((p, t) for _, p, t in front_ends):  # later calls from either front-end succeed
        png, _ = await make_png(port, token)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


async def test_a_clients_cancel_reaches_the_replica_and_stops_its_model_at_the_next_step(
    cluster: dict[str, str], front_ends: list[tuple[Path, int, str | None]]
) -> None:
    """The client cancels a long call after a few steps: the cancel crosses client → front-end → replica, the
    replica's model stops at its next step boundary (the replica's log says so long before the remaining steps
    could have run), nothing is stored, and the next call runs at once. The replica's own line is what counts:
    Serve writes its access line for a cancelled call only when a CancelledError reaches its request wrapper, and
    one CI run saw none."""
    _, port, token = front_ends[1]
    before = await image_count(port, token)
    steps = Steps()
    async with Client(authed(port, token)) as client:
        scope = anyio.CancelScope()

        async def doomed() -> None:
            with scope:
                await client.call_tool("generate", long_call(4), progress_callback=steps.on_progress)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(doomed)
            with anyio.fail_after(120):
                await steps.three.wait()
            watch = StopWatch(cluster)
            watch.start()
            scope.cancel()
        stopped_after = await anyio.to_thread.run_sync(assert_stopped_at_the_next_step, watch, steps)
        print(
            f"measured: a cancel stopped the replica's model {stopped_after:.2f} s after the client sent it"
        )
        after = await client.call_tool("generate", {**RECIPE, "seed": 8})
        assert not after.is_error, after
    assert await image_count(port, token) == before + 1, "the cancelled call stored nothing"


async def test_a_front_end_killed_mid_call_frees_its_replica_at_the_next_step(
    tmp_path: Path, cluster: dict[str, str], deployed: str
) -> None:
    """A front-end SIGKILLed while a replica runs its call: its gRPC connection drops, the replica's server
    cancels the call, and the model stops at its next step (the replica's log says so) rather than running its
    ~97 remaining steps or waiting for the per-call deadline (`limits.REPLICA_DEADLINE_S`)."""
    env = {**cluster, "PYTHONPATH": str(REPO)}
    steps = Steps()
    options = ("--generator", f"ray:{APP}")
    watch = StopWatch(cluster)
    with (
        http_server(tmp_path, tmp_path / "store", *options, env=env, model=None) as (proc, port, token),
        contextlib.suppress(Exception),  # the client's connection drops with the front-end
    ):
        async with Client(authed(port, token)) as client, anyio.create_task_group() as tasks:

            async def call() -> None:
                await client.call_tool("generate", long_call(5), progress_callback=steps.on_progress)

            tasks.start_soon(call)
            with anyio.fail_after(120):
                await steps.three.wait()
            watch.start()  # timed from the kill, whatever the teardown below takes
            proc.kill()
            tasks.cancel_scope.cancel()
    stopped_after = await anyio.to_thread.run_sync(assert_stopped_at_the_next_step, watch, steps)
    print(f"measured: a front-end's death stopped its replica's model {stopped_after:.2f} s after the kill")


async def test_a_call_too_large_for_one_grpc_message_goes_through_rays_objects(
    front_ends: list[tuple[Path, int, str | None]],
) -> None:
    """Two 1024² references are 6 MiB of pixels, over the 4 MiB a message of the replicas' gRPC data plane takes:
    the call goes as Ray tasks and objects instead (`handle.fits_grpc`) and succeeds."""
    _, port, token = front_ends[0]
    references = [reference_uri(k, side=1024) for k in range(2)]
    compose = {"images": references, "prompt": "both, side by side", "width": 64, "height": 64, "steps": 2}
    async with Client(authed(port, token)) as client:
        made = await client.call_tool("compose", compose)
    assert not made.is_error, made.content
    assert made.structured_content["images"][0]["width"] == 64


async def test_a_call_giving_one_side_is_sized_as_the_model_makes_it_and_succeeds(
    tmp_path: Path, cluster: dict[str, str], deployed: str
) -> None:
    """`width` 1280 alone (the height keeps 1024²'s aspect: 1280x1280) makes 4.7 MiB of pixels, over what one gRPC
    message takes, though the call's own size looks like 1024²: it goes as Ray tasks and objects and its picture
    comes back (over gRPC it failed with "Received message larger than max"). A front-end whose budget allows it
    (`--max-megapixels`: the replica's CPU budget is 512²)."""
    env = {**cluster, "PYTHONPATH": str(REPO)}
    options = ("--generator", f"ray:{APP}", "--max-megapixels", "2")
    wide = {"prompt": "wide", "width": 1280, "seed": 3, "steps": 1}
    with http_server(tmp_path, tmp_path / "store", *options, env=env, model=None) as (_, port, token):
        async with Client(authed(port, token)) as client:
            made = await client.call_tool("generate", wide)
    assert not made.is_error, made.content
    picture = made.structured_content["images"][0]
    assert (picture["width"], picture["height"]) == (1280, 1280)


def test_a_front_end_naming_a_missing_application_says_to_deploy_it(cluster: dict[str, str]) -> None:
    probe = (
        "from klein_agent.replica.handle import ray_generator_factory\n"
        "try:\n    ray_generator_factory('nope', timeout_s=5)()\n"
        "except RuntimeError as exc:\n    print(exc)\n"
    )
    env = {**cluster, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    said = done.stdout.strip()
    assert said.startswith("no Ray Serve application 'nope' on 127.0.0.1:"), done.stdout + done.stderr[-2000:]
    assert "run klein-agent deploy --model MODEL --app nope first" in said, said


def test_an_autoscaled_application_starts_with_no_replica_and_scales_up_for_a_call(
    cluster: dict[str, str],
) -> None:
    """`deploy --autoscale 0:1`: Serve takes the autoscaling config, starts no replica, and adds one when a call
    waits (deploy's own question for the model's description), within the deploy command."""
    app = "klein-auto"
    deploy = ["-m", "klein_agent", "deploy", "--model", "tiny", "--autoscale", "0:1", "--app", app]
    env = {**cluster, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, *deploy], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert f"application '{app}' on {cluster['RAY_ADDRESS']}: 1 replica(s) running tiny" in output, output[
        -2000:
    ]
