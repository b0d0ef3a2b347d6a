"""examples/ works as shipped: the scripted agent loop runs on the tiny model, the client configs are valid."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_agent_loop_runs_on_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "klein-agent-loop"  # the default --out, under the working folder: kept after the run
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "agent_loop.py"), "--size", "64", "--rounds", "2",
         "--store", str(tmp_path / "store")],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("server: model tiny")
    assert sum(line.startswith("generate ") for line in lines) == 2
    assert sum(line.startswith("edit ") for line in lines) <= 2
    assert any(line.startswith("compose ") for line in lines)
    best = re.search(r"^best (img_\S+): distance", done.stdout, re.M)
    assert best and (out / "best.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_configs_are_valid_and_start_the_server() -> None:
    for name in ("claude_desktop_config.json", "claude_code.mcp.json"):
        server = json.loads((EXAMPLES / name).read_text())["mcpServers"]["klein-agent"]
        assert server["command"].startswith("/") and server["command"].endswith("/klein-agent")
        assert server["args"][:3] == ["serve", "--model", "black-forest-labs/FLUX.2-klein-4B"]
    add = (EXAMPLES / "claude_code_add.sh").read_text()
    assert 'claude mcp add --scope project klein-agent -- "$(command -v klein-agent)" serve --model' in add
    # the HTTP registration, commented out in the script, is the one docs/server.md gives: with the bearer token
    uncommented = "\n".join(line.removeprefix("# ") for line in add.splitlines())
    docs = (EXAMPLES.parent / "docs" / "server.md").read_text()
    http_add = re.search(r"^claude mcp add --transport http .*\\\n.*--header .*$", docs, re.M)
    assert http_add and "Authorization: Bearer $(cat " in http_add.group(0)
    assert http_add.group(0) in uncommented


def test_an_allow_dir_that_does_not_exist_is_named_with_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "Pictures" / "klein"
    done = subprocess.run(
        [sys.executable, "-m", "klein_agent", "serve", "--model", "tiny", "--store", str(tmp_path / "s"),
         "--allow-dir", str(missing)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--allow-dir {missing} does not exist: create it (mkdir -p '{missing}')" in done.stderr
