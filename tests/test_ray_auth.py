"""Ray's token authentication is required wherever klein-agent joins a cluster (issue 20 point 8): `deploy` and
`serve --generator ray` refuse, before connecting, an environment without RAY_AUTH_MODE=token, saying what to set
and never echoing a token. (That a process without the token is refused by the cluster itself, and that the token
reaches no log, is tests/test_replica_e2e.py, on a real cluster.)"""

from __future__ import annotations

import pytest

from klein_agent.rules.ray_auth import ray_auth_problem

SECRET = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("mode", [None, "", "disabled", "k8s"])
def test_without_token_mode_the_rule_refuses_naming_what_to_set(mode: str | None) -> None:
    env = {"RAY_AUTH_TOKEN": SECRET} | ({} if mode is None else {"RAY_AUTH_MODE": mode})
    problem = ray_auth_problem(env, "deploy")
    assert problem is not None and problem.startswith("deploy connects to Ray only with token authentication")
    assert "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN" in problem
    assert SECRET not in problem


@pytest.mark.parametrize("mode", ["token", "TOKEN", " token "])
def test_token_mode_passes(mode: str) -> None:
    assert ray_auth_problem({"RAY_AUTH_MODE": mode}, "deploy") is None


def test_deploy_refuses_before_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from klein_agent.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # discard port: a connection attempt would hang or fail
    monkeypatch.setenv("RAY_AUTH_TOKEN", SECRET)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert main(["deploy", "--model", "tiny", "--replicas", "1"]) == 2
    err = capsys.readouterr().err
    assert "deploy connects to Ray only with token authentication on (RAY_AUTH_MODE is unset)" in err, err
    assert SECRET not in err


def test_a_front_end_on_ray_without_token_mode_fails_its_load_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from klein_agent.replica.handle import ray_generator_factory
    from klein_agent.service.engine import Engine, EngineState

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    engine = Engine(ray_generator_factory("klein"))
    engine.start()
    try:
        assert engine.wait_loaded(30) == EngineState.FAILED
        error = engine.status().error or ""
        assert (
            "--generator ray connects to Ray only with token authentication on (RAY_AUTH_MODE is 'disabled')"
            in error
        )
    finally:
        engine.close()
