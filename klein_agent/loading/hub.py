"""Finding a model: a folder as given, or a repo id's snapshot in the local Hugging Face cache.

The cache layout is the one huggingface_hub writes (`models--owner--name/snapshots/<revision>`, `refs/main`);
huggingface_hub itself is imported only to download, which needs `--allow-download`.
"""

from __future__ import annotations

import json
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
    """A folder as given, or a repo id's snapshot in the local Hugging Face cache (downloaded only if allowed).

    Raises CheckpointError (see `check_model_source`), also when a download fails (no network, unknown repo)."""
    found = check_model_source(model, allow_download=allow_download)
    if found is not None:
        return found
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub ships with transformers
        raise CheckpointError("downloading needs huggingface_hub: pip install 'klein-agent[hub]'") from err
    try:
        return Path(snapshot_download(model))
    except (
        Exception
    ) as err:  # no network, an unknown or gated repo: huggingface_hub and httpx raise many kinds
        raise CheckpointError(
            f"could not download {model} ({type(err).__name__}: {err}). On a machine with network access run "
            f"`{download_command(model)}` and copy its Hugging Face cache folder to {hub_cache_dir()} here, or "
            "pass the model's folder to --model."
        ) from err


def check_model_source(model: str, *, allow_download: bool = False) -> Path | None:
    """The folder `--model` names (a folder with model_index.json, or FLUX 3's modular_model_index.json naming a
    Flux3 pipeline, or a repo id's cached snapshot), or None when
    a repo id is missing from the cache and `allow_download` lets it be fetched (`tiny` is the caller's).

    Reads only the filesystem (no torch, no network), so the CLI checks --model before anything heavy loads.
    Raises CheckpointError naming --model and the folder: no such folder, a file, a folder without
    model_index.json, a name that is no repo id, a repo id missing from the cache (without `allow_download`).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return _model_folder(model, path)
    if path.exists():
        raise CheckpointError(
            f"--model {model} is a file, not a model folder; pass the diffusers-layout folder (a BFL single-file "
            "transformer goes to --transformer-file)"
        )
    if not _REPO_ID.match(model) or path.is_absolute() or model.startswith((".", "~")):
        looks_like_path = (
            path.is_absolute() or model.startswith((".", "~")) or os.sep in model or "/" in model
        )
        if looks_like_path:
            raise CheckpointError(f"--model {model}: there is no folder {path.absolute()}")
        raise CheckpointError(
            f"--model {model!r} is neither a folder here nor a Hugging Face repo id (owner/name, e.g. "
            "black-forest-labs/FLUX.2-klein-4B), nor a built-in model such as 'tiny' or 'flux3-tiny'"
        )
    cached = cached_snapshot(model)
    if cached is not None:
        return _model_folder(model, cached, cached=True)
    if not allow_download:
        raise CheckpointError(
            f"{model} is not in the local Hugging Face cache ({hub_cache_dir()}). Download it first "
            f"(`{download_command(model)}`), pass a local folder, or add --allow-download."
        )
    return None


def _model_folder(model: str, folder: Path, *, cached: bool = False) -> Path:
    """`folder` when it holds a diffusers model index; else CheckpointError naming the folder and the next step."""
    if (folder / "model_index.json").is_file():
        return folder
    if is_flux3(folder):  # FLUX 3 [klein]: diffusers' modular pipelines write no model_index.json
        return folder
    if cached:
        raise CheckpointError(
            f"--model {model}: the cached snapshot {folder} has no model_index.json (FLUX.2) or {MODULAR_INDEX} "
            f"(FLUX 3): an unfinished download? Run `{download_command(model)}` to complete it"
        )
    raise CheckpointError(
        f"--model {model}: the folder {folder.absolute()} has no model_index.json; pass the folder of a "
        "diffusers-layout model (model_index.json with transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
    )


MODULAR_INDEX = (
    "modular_model_index.json"  # diffusers' modular pipelines (FLUX 3) write this, not model_index.json
)


def is_flux3(folder: Path) -> bool:
    """Whether `folder` holds a FLUX 3 [klein] model: its modular index names a Flux3 pipeline (no torch)."""
    return _flux3_pipeline_class(folder) is not None


def _flux3_pipeline_class(folder: Path) -> str | None:
    """The FLUX 3 pipeline class `folder`'s modular index names, or None (no index, unreadable, another model)."""
    try:
        index = json.loads((folder / MODULAR_INDEX).read_text())
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if isinstance(name, str) and name.startswith("Flux3") else None


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


def repo_of_snapshot(folder: Path) -> str | None:
    """The repo id whose cached snapshot `folder` is (`…/models--owner--name/snapshots/<revision>`), else None."""
    found = CACHED_REPO.search(str(Path(folder).absolute()) + os.sep)
    return f"{found.group('owner')}/{found.group('name')}" if found else None


def completion_hint(folder: Path) -> str:
    """What to do about a file missing from model folder `folder`: finish the download when it is a cached snapshot
    (an interrupted or partial `hf download`), else copy the folder again. Every "incomplete" message ends with it."""
    repo = repo_of_snapshot(folder)
    if repo is not None:
        return f"run `{download_command(repo)}` again to finish it"
    return "download or copy the model folder again"


LICENCE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md")
LICENCE_READ_BYTES = (
    4096  # the first line is the licence's title; a huge or binary file costs no more than this
)
LICENCE_LINE_CHARS = 160


def licence_line(folder: Path) -> tuple[str, str] | None:
    """(file name, its first non-blank line) of the licence file a model folder ships (`LICENSE`, `LICENSE.md`,
    ...; Hugging Face repos carry their licence this way), or None when there is none. Reads at most
    LICENCE_READ_BYTES; Markdown heading marks are dropped and the line is cut to LICENCE_LINE_CHARS. Never raises
    for an unreadable file (it is reported as unreadable): the licence is information, not a reason to refuse."""
    for name in LICENCE_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            with path.open("rb") as f:
                head = f.read(LICENCE_READ_BYTES).decode("utf-8", errors="replace")
        except OSError as err:
            return name, f"(unreadable: {err.strerror})"
        for line in head.splitlines():
            text = " ".join(line.strip().lstrip("#").split())
            if text:
                return name, text[:LICENCE_LINE_CHARS]
        return name, "(empty)"
    return None
