"""What `klein-agent deploy` asks Serve for, without a cluster: `--autoscale MIN:MAX` (checked, exclusive with
`--replicas`, turned into Serve's autoscaling config on queue length, which Serve's own validation accepts), the
queue bound and the cache-affinity router, and `--print-config`, the Serve config file that examples/ holds for
`serve deploy` and a KubeRay RayService: each example equals what its recorded command prints, and Serve's schema
and application builder accept it.

Deploying to a real cluster: tests/test_replica_e2e.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from klein_agent.cli import main
from klein_agent.replica.config import APP_BUILDER, deployment_options
from klein_agent.rules import limits
from tests.http_helpers import REPO

yaml = pytest.importorskip(
    "yaml", reason="the scale extra (ray[serve], which brings PyYAML) is not installed"
)
pytest.importorskip("ray.serve", reason="the scale extra (ray[serve]) is not installed")

EXAMPLES = REPO / "examples"


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The usage error `argv` gets (exit 2), as stderr says it."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("3:1", "MIN must not exceed MAX, got '3:1'; e.g. 1:3"),
        ("0:0", "MIN must be 0 or more and MAX 1 or more, got '0:0'"),
        ("-1:2", "MIN must be 0 or more and MAX 1 or more, got '-1:2'"),
        ("2", "expected MIN:MAX replicas, e.g. 1:4, got '2'"),
        ("1:x", "expected two whole numbers MIN:MAX, e.g. 1:4, got '1:x'"),
    ],
)
def test_a_bad_autoscale_range_is_refused_naming_the_option_and_the_fix(
    given: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(["deploy", "--model", "tiny", f"--autoscale={given}"], capsys)  # = lets -1 through
    assert f"argument --autoscale: {said}" in err, err


def test_autoscale_and_a_replica_count_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(["deploy", "--model", "tiny", "--replicas", "2", "--autoscale", "1:2"], capsys)
    assert "argument --autoscale: not allowed with argument --replicas" in err, err


def test_a_queue_bound_serve_cannot_take_is_refused_before_any_cluster(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = refused(["deploy", "--model", "tiny", "--max-queue", "0"], capsys)
    assert "argument --max-queue" in err, err


def test_autoscale_becomes_serves_config_on_queue_length_and_serve_accepts_it() -> None:
    from klein_agent.replica.deployment import build_app

    options = deployment_options(autoscale=(0, 3), max_queued=5)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_ongoing_requests": limits.AUTOSCALE_TARGET_ONGOING,
        "upscale_delay_s": limits.AUTOSCALE_UPSCALE_DELAY_S,
        "downscale_delay_s": limits.AUTOSCALE_DOWNSCALE_DELAY_S,
    }
    assert options["max_ongoing_requests"] == 1 and options["max_queued_requests"] == 5
    assert options["request_router_config"] == {"request_router_class": limits.RAY_ROUTER}
    build_app({"model": "tiny"}, autoscale=(0, 3), max_queued=5)  # Serve validates the options here
    with pytest.raises(
        ValueError, match=r"max_replicas \(1\) must be greater than or equal to min_replicas \(3\)"
    ):
        build_app({"model": "tiny"}, autoscale=(3, 1))  # ... so its validation is what accepted the one above
    assert deployment_options(replicas=2)["num_replicas"] == 2


def recorded_command(example: Path) -> list[str]:
    """The `klein-agent deploy ... --print-config` command an example's header says it was made by."""
    lines = [line for line in example.read_text().splitlines() if line.startswith("#   klein-agent deploy ")]
    assert len(lines) == 1, f"{example.name} names the command that made it"
    return shlex.split(lines[0].removeprefix("#   klein-agent "))


def printed(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the file is printed without any cluster
    capsys.readouterr()
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["serve_config.yaml", "rayservice.yaml"])
def test_each_example_is_what_deploy_prints_for_its_command_and_serve_accepts_it(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.serve.schema import ServeDeploySchema

    from klein_agent.replica.deployment import app_from_args

    example = EXAMPLES / name
    document = yaml.safe_load(example.read_text())
    if document.get("kind") == "RayService":
        assert document["apiVersion"] == "ray.io/v1"
        config = yaml.safe_load(document["spec"]["serveConfigV2"])
    else:
        config = document
    assert config == printed(recorded_command(example), capsys, monkeypatch)
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == APP_BUILDER
    app_from_args(application["args"])  # the builder Serve imports accepts the block as deploy built it


def test_deploy_builds_its_application_from_the_block_it_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One path: the `args` --print-config shows are what deploy hands the application builder."""
    import klein_agent.replica.deployment as deployment

    argv = ["deploy", "--model", "tiny", "--replicas", "3", "--cpus-per-replica", "0.5", "--app", "team"]
    config = printed([*argv, "--print-config"], capsys, monkeypatch)
    built: list[dict[str, Any]] = []

    def spy(args: dict[str, Any]) -> Any:
        built.append(args)
        raise RuntimeError("stop before the cluster")

    monkeypatch.setattr(deployment, "app_from_args", spy)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv(
        "RAY_AUTH_MODE", "token"
    )  # deploy refuses a cluster without token auth (rules/ray_auth)
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    from ray import serve

    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    assert main(argv) == 2
    assert "deploying 'team' to 127.0.0.1:1 failed: stop before the cluster" in capsys.readouterr().err
    assert built == [config["applications"][0]["args"]]
    assert config["applications"][0]["name"] == "team"
    assert built[0]["placement"] == {
        "replicas": 3,
        "cpus_per_replica": 0.5,
        "gpus_per_replica": 0.0,
        "max_queued": 8,
    }


def test_every_model_option_deploy_parses_goes_to_the_replicas_or_is_refused() -> None:
    """The kind of bug where deploy accepted an option and dropped it: each option of the "model" group is either
    forwarded (MODEL_OPTION_NAMES) or refused by name (NOT_ON_REPLICAS), never neither."""
    import argparse

    from klein_agent.model_options import add_model_arguments
    from klein_agent.replica.config import MODEL_OPTION_NAMES, NOT_ON_REPLICAS

    parser = argparse.ArgumentParser()
    add_model_arguments(parser, serve=True)
    (group,) = [g for g in parser._action_groups if g.title == "model"]
    parsed = {action.dest for action in group._group_actions}
    assert parsed == set(MODEL_OPTION_NAMES) | set(NOT_ON_REPLICAS), parsed
    assert not set(MODEL_OPTION_NAMES) & set(NOT_ON_REPLICAS)


@pytest.mark.parametrize("print_config", [True, False])
def test_deploy_refuses_the_prompt_upsampler_by_name_as_serve_generator_ray_does(
    print_config: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas load no upsampler: deploy says so (the sentence `serve --generator ray` says) instead of printing a
    config or deploying an application without it; nothing is printed on stdout and no cluster is asked."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # were the cluster asked, the error would name it
    argv = ["deploy", "--model", "tiny", "--prompt-upsampler", str(tmp_path / "nope")]
    assert main([*argv, "--print-config"] if print_config else argv) == 2
    said = capsys.readouterr()
    assert said.out == ""
    assert (
        "--prompt-upsampler does not apply with deploy: the replicas load the model without it; leave it out "
        "(callers can still pass a caption)" in said.err
    ), said.err
