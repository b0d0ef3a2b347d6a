"""`klein-agent models`: the official checkpoints klein-agent runs, their steps and licence, and what the local
Hugging Face cache holds of them (a driver beside cli.py; no torch, no network).

The licence column is what Black Forest Labs' model tables say (the presets in `model/configs.py`); a checkpoint's
own LICENSE file is the authority, so for every cached snapshot (and for `--model FOLDER|REPO`) its first line is
printed beside it. The model start-up log prints the same line (`model_options.check_model_options`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from klein_agent.loading.hub import cached_snapshot, download_command, hub_cache_dir, licence_line
from klein_agent.model.configs import PRESETS, ModelPreset


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """The `models` command's options (`--model`) and its runner."""
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FOLDER|REPO",
        help="also show this model folder's or cached repo's LICENSE line (repeatable)",
    )
    parser.set_defaults(run=run_models)


def steps_text(p: ModelPreset) -> str:
    """`16` for a distilled model, `50, CFG 3.5` for a Base model (its defaults, from the presets)."""
    s = p.sampling
    return str(s.steps) if s.distilled else f"{s.steps}, CFG {s.guidance:g}"


def licence_text(folder: Path) -> str:
    """`LICENSE.md: <first line>` or a note that the folder has no licence file."""
    found = licence_line(folder)
    return f"{found[0]}: {found[1]}" if found else "no LICENSE file in the folder: check the model card"


def run_models(args: argparse.Namespace) -> int:
    """Print one line per official checkpoint: preset, repo, default steps, licence (BFL's table), and where the
    cache has it with its LICENSE line, or the command that downloads it; then one line per `--model`. Returns 0;
    a `--model` that is neither a folder nor a cached repo raises ValueError naming it."""
    rows = [("preset", "repo", "steps", "licence (BFL's table)", "local copy")]
    for p in PRESETS.values():
        if p.repo is None:
            continue
        snapshot = cached_snapshot(p.repo)
        where = (
            f"{snapshot} ({licence_text(snapshot)})"
            if snapshot
            else f"not cached: `{download_command(p.repo)}`"
        )
        rows.append((p.name, p.repo, steps_text(p), p.licence, where))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[4])
    for model in args.model:
        folder = _local_folder(model)
        # a repo id: where its snapshot is; a folder: named once, as given
        where = "" if Path(model).expanduser().is_dir() else f"{folder} "
        print(f"{model}: {where}({licence_text(folder)})")
    print(
        "The licence column is BFL's model table; the LICENSE file shipped with the checkpoint is what binds you."
    )
    return 0


def _local_folder(model: str) -> Path:
    """`model` as a folder here, else its cached snapshot (any model family: only its files are read)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    snapshot = cached_snapshot(model) if "/" in model and not path.is_absolute() else None
    if snapshot is None:
        raise ValueError(
            f"--model {model}: neither a folder here nor a repo id in the local Hugging Face cache ({hub_cache_dir()})"
        )
    return snapshot
