"""A front-end of `serve --generator ray` needs no weights: it learns the model, its defaults, limits and LoRA
adapters from the deployed application (the replica's `info`), so `--model` may be left out, and the options that
load a model are refused there with the fix (they belong to `deploy`). Serve's local testing mode stands in for the
cluster (the replica runs in this process); only the connection to the cluster is replaced, by a handle to that
application. The same front-end, without --model, on a real cluster: tests/test_replica_e2e.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from klein_agent.cli import build_parser, main
from klein_agent.server.app import build_server
from klein_agent.service.engine import EngineState
from tests.test_server_loras import tiny_lora
from tests.test_server_tools import call, ids_of, read_meta

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before Ray is imported; local mode starts no cluster
serve = pytest.importorskip("ray.serve", reason="the scale extra (ray[serve]) is not installed")

APP = "front-end-test"
TINY = {"model": "tiny", "transformer_file": None, "device": None, "dtype": None, "allow_download": False}


@pytest.fixture(scope="module")
def application(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The application as `deploy --model tiny --lora style.safetensors:0.8` makes it (local testing mode)."""
    from klein_agent.replica.deployment import build_app

    lora = tiny_lora(tmp_path_factory.mktemp("adapters") / "style.safetensors", 1)
    yield serve.run(build_app({**TINY, "lora": [f"{lora}:0.8"]}), name=APP, _local_testing_mode=True)


@pytest.fixture
def front_end(
    application: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, list[str]]]:
    """(studio, argv) of `serve --generator ray:APP` built as `run_serve` builds it; the cluster connection is the
    local application's handle, and any attempt to load a model here fails the test."""
    from klein_agent.server import serve as serve_module

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    monkeypatch.setenv(
        "RAY_AUTH_MODE", "token"
    )  # a front-end connects only with token auth on (rules/ray_auth)
    monkeypatch.setattr("klein_agent.replica.handle.connect_application", lambda address, app: application)

    def no_local_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the front-end tried to load a model of its own")

    monkeypatch.setattr(serve_module, "generator_factory", no_local_model)
    monkeypatch.setattr("klein_agent.loading.hub.check_model_source", no_local_model)
    argv = ["serve", "--generator", f"ray:{APP}", "--store", str(tmp_path / "store"), "--no-default-dirs"]
    yield serve_module, argv


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(front_end: tuple[Any, list[str]]) -> AsyncIterator[Client]:
    serve_module, argv = front_end
    args = build_parser().parse_args(argv)
    assert args.model is None
    studio = serve_module.build_studio(args)
    try:
        async with Client(build_server(studio)) as connected:
            yield connected
    finally:
        await studio.engine.aclose()
        studio.store.close()


@pytest.mark.anyio
async def test_a_front_end_without_model_options_takes_the_applications_model_and_adapters(
    client: Client, application: Any
) -> None:
    replica_info = await application.options(method_name="info").remote()
    made = await call(
        client,
        "generate",
        {"prompt": "a kite", "width": 64, "height": 64, "seed": 5, "loras": [{"name": "style"}]},
    )
    recipe = (await read_meta(client, ids_of(made)[0]))["recipe"]
    assert recipe["model"] == "tiny" and recipe["steps"] == replica_info.default_steps, recipe
    assert recipe["loras"] == [{"name": "style", "scale": 0.8}], recipe
    status = (await call(client, "server_status", {})).structured_content["model"]
    assert status["state"] == "ready" and status["model"] == replica_info.model == "tiny"
    assert status["default_steps"] == replica_info.default_steps
    assert status["max_references"] == replica_info.max_references
    assert status["loras"] == [{"name": "style", "scale": 0.8}]


def test_a_model_named_on_the_front_end_must_be_the_applications(front_end: tuple[Any, list[str]]) -> None:
    serve_module, argv = front_end
    studio = serve_module.build_studio(build_parser().parse_args([*argv, "--model", "some/other-model"]))
    try:
        studio.engine.start()
        assert studio.engine.wait_loaded(60) == EngineState.FAILED
        error = studio.engine.status().error or ""
        assert f"--model some/other-model: the Ray application '{APP}' runs tiny; drop --model" in error, (
            error
        )
    finally:
        studio.engine.close()
        studio.store.close()
    matching = serve_module.build_studio(build_parser().parse_args([*argv, "--model", "tiny"]))
    try:
        matching.engine.start()
        assert matching.engine.wait_loaded(60) == EngineState.READY
    finally:
        matching.engine.close()
        matching.store.close()


def test_loading_options_on_a_ray_front_end_are_refused_naming_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["serve", "--generator", "ray", "--store", str(tmp_path / "store"), "--no-default-dirs"]
    assert main([*argv, "--lora", str(tmp_path / "style.safetensors"), "--fp8", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device, --fp8, --lora: with --generator ray the model loads on the replicas" in err, err
    assert "klein-agent deploy" in err
    assert main([*argv, "--reference-kv-cache-gib", "0"]) == 2, "0 is given too"
    assert "--reference-kv-cache-gib: with --generator ray" in capsys.readouterr().err


def test_serve_with_a_local_model_still_needs_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["serve", "--store", str(tmp_path / "store"), "--no-default-dirs"]) == 2
    err = capsys.readouterr().err
    assert "serve needs --model MODEL" in err and "--generator ray[:APP]" in err, err
    assert not (tmp_path / "store").exists(), "nothing created for a refused start"
