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
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "agent_loop.py"), "--size", "64", "--rounds", "2",
         "--store", str(tmp_path / "store"), "--out", str(out)],
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
        assert server["command"].endswith("klein-agent")
        assert server["args"][:3] == ["serve", "--model", "black-forest-labs/FLUX.2-klein-4B"]
    add = (EXAMPLES / "claude_code_add.sh").read_text()
    assert "claude mcp add --scope project klein-agent -- klein-agent serve --model" in add
