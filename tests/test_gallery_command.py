"""The `gallery_command` that `server_status` prints: for a folder store its path (tests/test_server_tools.py), for a
shared store the options `serve` opened it with, without secrets: `env:NAME` kept as given, a DSN's password left
out (in the URL's user part and as a `password=` parameter, as written or percent-encoded), an endpoint's user
information left out. The printed command is parsed back by the gallery's own parser, so it is one a person can
run. The same command, run as a real process against a real PostgreSQL + S3: tests/test_store_shared_e2e.py.
"""

from __future__ import annotations

import argparse
import shlex

import pytest

from klein_agent.cli import build_parser
from klein_agent.option_types import BLOBS_ENV, STORE_ENV, store_locations
from klein_agent.server.serve import gallery_command
from klein_agent.service.store.dsn import without_password

SECRET = "s3cr%40t-pw"


def command_for(*serve_argv: str) -> str:
    args = build_parser().parse_args(["serve", "--model", "tiny", *serve_argv])
    return gallery_command(args, store_locations(args.store))


def as_gallery_parses_it(command: str) -> argparse.Namespace:
    words = shlex.split(command)
    assert words[:2] == ["klein-agent", "gallery"], command
    parsed: argparse.Namespace = build_parser().parse_args(words[1:])
    return parsed


@pytest.fixture(autouse=True)
def no_store_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (STORE_ENV, BLOBS_ENV, "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def test_a_dsn_typed_with_its_password_is_printed_without_it() -> None:
    dsn = f"postgresql://klein:{SECRET}@db.internal:5433/klein?sslmode=require&password={SECRET}&connect_timeout=5"
    command = command_for(
        "--store", dsn, "--blobs", "s3://klein/images", "--s3-endpoint", "http://minio.internal:9000"
    )
    assert command == (
        "klein-agent gallery --store 'postgresql://klein@db.internal:5433/klein?sslmode=require&connect_timeout=5' "
        "--blobs s3://klein/images --s3-endpoint http://minio.internal:9000 --open"
    )
    assert "s3cr" not in command and "password" not in command
    parsed = as_gallery_parses_it(command)
    assert parsed.store == "postgresql://klein@db.internal:5433/klein?sslmode=require&connect_timeout=5"
    assert parsed.blobs == "s3://klein/images" and parsed.open


def test_env_forms_are_kept_as_given_and_the_blobs_variable_is_spelt_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KLEIN_DSN", f"postgresql://klein:{SECRET}@db/klein")
    monkeypatch.setenv(BLOBS_ENV, "s3://team/pictures")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://key:other-secret@s3.internal")
    command = command_for("--store", "env:KLEIN_DSN")
    assert command == (
        "klein-agent gallery --store env:KLEIN_DSN --blobs s3://team/pictures --s3-endpoint https://s3.internal --open"
    )
    assert as_gallery_parses_it(command).store == f"postgresql://klein:{SECRET}@db/klein"


def test_a_dsn_from_the_store_variable_is_named_by_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STORE_ENV, f"postgresql://klein:{SECRET}@db/klein")
    command = command_for("--blobs", "s3://klein/images")
    assert command == f"klein-agent gallery --store env:{STORE_ENV} --blobs s3://klein/images --open"


def test_a_folder_store_is_named_by_its_path_as_before(tmp_path: object) -> None:
    command = command_for("--store", str(tmp_path))
    assert command == shlex.join(["klein-agent", "gallery", "--store", str(tmp_path), "--open"])


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u:pw@h/d", "postgresql://u@h/d"),
        ("postgres://u:p%40ss@h:5432/d?sslmode=verify-full", "postgres://u@h:5432/d?sslmode=verify-full"),
        ("postgresql://:pw@h/d", "postgresql://@h/d"),
        ("postgresql://u@h/d?password=pw", "postgresql://u@h/d"),
        ("postgresql://u@h/d?password=pw&a=1", "postgresql://u@h/d?a=1"),
        ("postgresql://u@h/d?a=1&PASSWORD=pw&b=2", "postgresql://u@h/d?a=1&b=2"),
        ("postgresql://u@/d?host=/tmp/pg", "postgresql://u@/d?host=/tmp/pg"),
    ],
)
def test_without_password_leaves_out_the_password_and_nothing_else(dsn: str, shown: str) -> None:
    assert without_password(dsn) == shown
