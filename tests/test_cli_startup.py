"""Start-up errors of `klein-agent generate`, `serve` and `gallery` as a user meets them (real subprocesses): bad
options are refused at once, before torch, transformers or the MCP SDK load, with a message that names the option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_ANOTHER_FOLDER = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, run from a tmp folder


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--model", "tiny", "--http", "--port", "99999"],
        ["serve", "--model", "tiny", "--http", "--port", "-1"],
        ["gallery", "--port", "99999"],
        ["gallery", "--port", "http"],
    ],
)
def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "klein_agent", *args, "--store", str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "argument --port:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (
        "must be from 0 to 65535 (0 picks a free port)" in done.stderr
        or "expected a port number" in done.stderr
    )
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-queue", "-1"], "argument --max-queue: must be 0 or more, got -1"),
        (["--max-megapixels", "0"], "argument --max-megapixels: must be positive, got 0"),
        (["--store-max-gb", "-2"], "argument --store-max-gb: must be positive, got -2"),
        (["--store-max-images", "0"], "argument --store-max-images: must be positive, got 0"),
    ],
)
def test_serve_limits_are_checked_as_they_are_parsed(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "klein_agent",
            "serve",
            "--model",
            "tiny",
            "--store",
            str(tmp_path / "s"),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--model", "nosuch", "--prompt", "x", "--out", "o.png"],
        ["generate", "--model", "tiny", "--device", "gpu", "--prompt", "x", "--out", "o.png"],
        ["serve", "--model", "nosuch"],
        ["serve", "--model", "tiny", "--allow-dir", "/no/such/folder"],
    ],
)
def test_option_errors_come_before_torch_and_the_mcp_sdk_load(tmp_path: Path, args: list[str]) -> None:
    # The measure of "instant" that does not depend on the machine's speed: nothing heavy was imported.
    script = (
        "import sys; from klein_agent.cli import main; status = main(sys.argv[1:]); "
        "print(status, 'torch' in sys.modules, 'transformers' in sys.modules, 'mcp' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=tmp_path,
        env=IN_ANOTHER_FOLDER,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["2", "False", "False", "False"], done.stderr
    assert "--" in done.stderr and "Traceback" not in done.stderr
