"""`klein-agent models` and the start-up log show the licence a checkpoint ships (its LICENSE file's first line)
beside BFL's table, as real processes over a fake Hugging Face cache (no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from klein_agent.model.configs import PRESETS

REPO = Path(__file__).resolve().parents[1]


def klein_agent(*args: str, hub: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(hub)}
    argv = [sys.executable, "-m", "klein_agent", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)


def test_models_lists_every_official_checkpoint_and_the_cached_licence(tmp_path: Path) -> None:
    repo = "black-forest-labs/flux-3-image-klein"
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "LICENSE.md").write_text("# FLUX Kommunity License\n\n...\n")
    other = tmp_path / "folder"
    other.mkdir()
    done = klein_agent("models", "--model", str(other), hub=tmp_path / "hub")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    official = [p for p in PRESETS.values() if p.repo]
    assert {p.name for p in official} >= {"flux3-klein", "flux3-klein-base", "klein-4b"}
    for p in official:
        (row,) = [line for line in lines if line.split()[:2] == [p.name, p.repo]]
        steps = (
            str(p.sampling.steps)
            if p.sampling.distilled
            else f"{p.sampling.steps}, CFG {p.sampling.guidance:g}"
        )
        assert steps in row and p.licence in row, row
        if p.repo == repo:
            assert f"{snapshot} (LICENSE.md: FLUX Kommunity License)" in row, row
        else:
            assert f"not cached: `hf download {p.repo}`" in row, row
    assert f"{other}: (no LICENSE file in the folder: check the model card)" in lines  # the folder named once
    by_repo = klein_agent("models", "--model", repo, hub=tmp_path / "hub")
    assert f"{repo}: {snapshot} (LICENSE.md: FLUX Kommunity License)" in by_repo.stdout.splitlines(), by_repo
    missing = klein_agent("models", "--model", "owner/absent", hub=tmp_path / "hub")
    assert (
        missing.returncode == 2
        and "--model owner/absent: neither a folder here nor a repo id" in missing.stderr
    )


def test_generate_logs_the_licence_of_the_folder_it_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "LICENSE").write_text("\n   Apache License\n   Version 2.0, January 2004\n")
    out = tmp_path / "x.png"
    args = (
        "generate",
        "--model",
        str(folder),
        "--prompt",
        "a cube",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        str(out),
    )
    done = klein_agent(*args, hub=tmp_path / "hub")
    assert done.returncode == 0, done.stderr
    assert "model licence (LICENSE): Apache License" in done.stderr and out.is_file()
    assert "licence" not in done.stdout
