"""What a user installs: the wheel and the sdist, built as pip builds them, carry the licence text and the
prompts, and say which licence they are under."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def test_the_wheel_carries_the_licence_and_the_prompts(built: tuple[Path, Path]) -> None:
    wheel, _ = built
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (licence_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert zf.read(licence_name).decode() == licence
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(metadata_name).decode())
        assert metadata["License-Expression"] == "Apache-2.0"
        assert metadata["License-File"] == "LICENSE"
        prompts = {p.name for p in (REPO / "prompts").glob("*.md")}
        assert prompts and prompts <= {Path(n).name for n in names if n.startswith("klein_agent/prompts/")}
        # the FLUX 3 upsampler's system prompts are read from the package at run time
        assert "klein_agent/rules/data/flux3_upsampler_prompts.json" in names
        view = {p.name for p in (REPO / "klein_agent" / "server" / "app_view").iterdir()}
        assert {"view.html", "view.css", "view.js"} <= view  # the MCP App's view, inlined at start
        assert view <= {Path(n).name for n in names if n.startswith("klein_agent/server/app_view/")}


def test_the_sdist_carries_the_licence_and_no_local_state(built: tuple[Path, Path]) -> None:
    _, sdist = built
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        (licence_name,) = [n for n in names if n.count("/") == 1 and n.endswith("/LICENSE")]
        member = tf.extractfile(licence_name)
        assert member is not None and member.read().decode() == (REPO / "LICENSE").read_text()
    assert not [n for n in names if "/.venv/" in n or "__pycache__" in n or n.endswith(".sqlite3")]
