"""Finding a model: a folder as given, or a repo id's snapshot in the local Hugging Face cache.

The cache layout is the one huggingface_hub writes (`models--owner--name/snapshots/<revision>`, `refs/main`);
huggingface_hub itself is imported only to download, which needs `--allow-download`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from klein_agent.loading.errors import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
CACHED_REPO = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")


def download_command(repo_id: str) -> str:
    """The shell command that fetches (or completes) `repo_id` into the local Hugging Face cache, with the CLI
    the installed huggingface_hub ships (`hf`; the old `huggingface-cli` is gone)."""
    return f"hf download {repo_id}"


def resolve_model_path(model: str, *, allow_download: bool = False) -> Path:
    """A folder as given, or a repo id's snapshot in the local Hugging Face cache (downloaded only if allowed)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not _REPO_ID.match(model) or path.is_absolute() or model.startswith("."):
        raise CheckpointError(f"model {model!r} is neither a folder nor a Hugging Face repo id (owner/name)")
    cached = cached_snapshot(model)
    if cached is not None:
        return cached
    if not allow_download:
        raise CheckpointError(
            f"{model} is not in the local Hugging Face cache ({hub_cache_dir()}). Download it first "
            f"(`{download_command(model)}`), pass a local folder, or add --allow-download."
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub ships with transformers
        raise CheckpointError("downloading needs huggingface_hub: pip install 'klein-agent[hub]'") from err
    return Path(snapshot_download(model))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME`/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot `refs/main` points at (else the newest), in the cache layout huggingface_hub writes."""
    repo_dir = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
