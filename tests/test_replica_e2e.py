"""Generator replicas as a user runs them: a local Ray cluster (token auth on, usage stats off), `klein-agent
deploy --model tiny --replicas 2`, then `klein-agent serve --http --generator ray:klein` and a real MCP client.
The PNG bytes equal those of the single-process server (`serve --model tiny`) for the same recipe, and the
replica's per-step progress reaches the client.

Runs in the contained child pytest of tests/test_replica_scaleout.py (loopback-only namespace); skipped with the
reason when run outside it.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from tests import store_servers
from tests.http_helpers import REPO, authed, http_server
from tests.ray_cluster import ray_cluster

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
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    deploy = ["-m", "klein_agent", "deploy", "--model", "tiny", "--replicas", "2", "--app", APP]
    env = {**cluster, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, *deploy], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert f"application '{APP}' on {cluster['RAY_ADDRESS']}: 2 replica(s) running tiny" in output, output[
        -2000:
    ]
    assert cluster["RAY_AUTH_TOKEN"] not in output, "the Ray token in deploy's output"

    (tmp_path / "ray").mkdir()
    (tmp_path / "local").mkdir()
    # no --model: the front-end takes the application's model and needs no weights of its own
    front_end = http_server(
        tmp_path / "ray", tmp_path / "ray" / "store", "--generator", f"ray:{APP}", env=env, model=None
    )
    with front_end as (_, port, token):
        remote_png, remote_heard = await make_png(port, token)
    log = (tmp_path / "ray" / "server.log").read_text()
    assert f"generator: Ray application '{APP}'" in log, log[-2000:]
    assert cluster["RAY_AUTH_TOKEN"] not in log, "the Ray token in the front-end's log"
    with http_server(tmp_path / "local", tmp_path / "local" / "store") as (_, port, token):
        local_png, local_heard = await make_png(port, token)

    assert remote_png[:8] == b"\x89PNG\r\n\x1a\n" and remote_png == local_png, "the same PNG bytes"
    steps = [m for m in remote_heard if m.startswith("step ")]
    assert steps == [f"step {k}/4" for k in range(1, 5)], remote_heard
    assert remote_heard[-1] == local_heard[-1], (remote_heard, local_heard)


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
