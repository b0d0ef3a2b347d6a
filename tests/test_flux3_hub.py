"""FLUX 3 [klein] repo ids from the local Hugging Face cache, as for FLUX.2, on a fake cache laid out as
huggingface_hub lays it out (`models--owner--name/{blobs,refs/main,snapshots/<rev>}`, every snapshot file a relative
symlink to its blob), with checkpoints diffusers wrote. No network. Also: the licence line a folder's LICENSE gives."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from flux3_reference_checkpoints import Flux3Shape, write_flux3_checkpoint

from klein_agent.loading.errors import CheckpointError
from klein_agent.loading.flux3_checkpoints import load_flux3_components
from klein_agent.loading.hub import (
    LICENCE_READ_BYTES,
    cached_snapshot,
    check_model_source,
    licence_line,
    repo_of_snapshot,
)

CPU = torch.device("cpu")
REPOS = {"black-forest-labs/flux-3-image-klein": True, "black-forest-labs/flux-3-image-klein-base": False}
LICENCE = (
    "# FLUX Kommunity License\n\nBlack Forest Labs ...\n"  # a stand-in: the real file is not on this machine
)


def cache_repo(hub: Path, repo: str, folder: Path, revision: str) -> Path:
    """`folder`'s files as huggingface_hub caches `repo` at `revision`; returns the snapshot folder."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("flux3")
    out = {}
    for repo, distilled in REPOS.items():
        folder = write_flux3_checkpoint(base / repo.split("/")[1], Flux3Shape(distilled=distilled))
        (folder / "LICENSE.md").write_text(LICENCE)
        out[repo] = folder
    return out


@pytest.mark.parametrize("repo", REPOS)
def test_repo_id_loads_from_the_cache_as_its_folder(
    repo: str, checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache.*hf download"):
        check_model_source(repo)
    snapshot = cache_repo(tmp_path / "hub", repo, checkpoints[repo], "c0ffee")
    cache_repo(tmp_path / "hub", repo, checkpoints[repo], "newer")  # the newest folder, but not refs/main's
    (snapshot.parents[1] / "refs" / "main").write_text("c0ffee")
    assert cached_snapshot(repo) == snapshot and repo_of_snapshot(snapshot) == repo
    cached = load_flux3_components(snapshot, CPU, torch.float32)
    direct = load_flux3_components(checkpoints[repo], CPU, torch.float32)
    assert cached.transformer.config.flow_map == REPOS[repo] == cached.sampling.distilled
    for module in ("transformer", "autoencoder"):
        theirs = getattr(direct, module).state_dict()
        ours = getattr(cached, module).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), module
    assert licence_line(snapshot) == ("LICENSE.md", "FLUX Kommunity License")  # through the blob symlink


def test_an_incomplete_snapshot_says_how_to_finish_it(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = "black-forest-labs/flux-3-image-klein"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = cache_repo(tmp_path / "hub", repo, checkpoints[repo], "abc")
    shutil.rmtree(snapshot / "vae")  # `hf download --include "transformer/*"`, or an interrupted download
    with pytest.raises(CheckpointError) as caught:
        load_flux3_components(snapshot, CPU, torch.float32)
    message = str(caught.value)
    assert "vae folder vae/" in message and f"run `hf download {repo}` again to finish it" in message, message
    (snapshot / "modular_model_index.json").unlink()  # no index at all
    with pytest.raises(CheckpointError) as caught:
        check_model_source(repo)
    message = str(caught.value)
    assert "modular_model_index.json (FLUX 3)" in message and f"`hf download {repo}`" in message, message


def test_licence_line_reads_the_first_line_boundedly(tmp_path: Path) -> None:
    assert licence_line(tmp_path) is None
    (tmp_path / "LICENSE").write_bytes(b"\n\n   Apache License\n   Version 2.0, January 2004\n")
    assert licence_line(tmp_path) == ("LICENSE", "Apache License")
    (tmp_path / "LICENSE").write_bytes(b"\n" * (LICENCE_READ_BYTES + 10) + b"late title\n")
    assert licence_line(tmp_path) == ("LICENSE", "(empty)")  # what lies past the bound is not read
    (tmp_path / "LICENSE").write_bytes(b"\xff\xfe" + b"x" * 1000)
    name, line = licence_line(tmp_path) or ("", "")
    assert name == "LICENSE" and len(line) == 160  # undecodable bytes replaced, the line cut
