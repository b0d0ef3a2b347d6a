"""Finding the prompt upsampler `--prompt-upsampler` names, on the filesystem only (no torch, no network), so the
CLI and `serve` refuse a wrong value before anything heavy loads."""

from __future__ import annotations

import json
from pathlib import Path

from klein_agent.loading.errors import CheckpointError
from klein_agent.loading.hub import cached_snapshot, download_command

UPSAMPLER_REPO = "black-forest-labs/flux-3-image-klein-pup"
UPSAMPLER_MODEL_TYPE = (
    "qwen3_5"  # Qwen3_5ForConditionalGeneration, the class diffusers' upsampler block loads
)
# what the upsampler needs beside its weights: the model's config, the tokenizer and the picture preprocessing
UPSAMPLER_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def check_upsampler_files(source: str) -> Path:
    """The folder `source` names (a folder, or a repo id's snapshot in the local Hugging Face cache), checked to
    hold a qwen3_5 config, its weights (*.safetensors), a tokenizer and preprocessor_config.json.

    Raises CheckpointError naming --prompt-upsampler, the folder and the missing or wrong file, with the fix."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise CheckpointError(
            f"--prompt-upsampler {source}: is a file; pass the upsampler's folder or repo id"
        )
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        snapshot = cached_snapshot(source)
        if snapshot is None:
            raise CheckpointError(
                f"--prompt-upsampler {source}: not in the local Hugging Face cache; run `{download_command(source)}` "
                f"(BFL's upsampler is {UPSAMPLER_REPO}) or pass its folder"
            )
        folder = snapshot
    else:
        raise CheckpointError(
            f"--prompt-upsampler {source}: no such folder, and not a repo id (owner/name such as {UPSAMPLER_REPO})"
        )
    missing = [name for name in UPSAMPLER_FILES if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise CheckpointError(
            f"--prompt-upsampler {source}: {folder} lacks {', '.join(missing)}; pass the folder of a prompt "
            f"upsampler as {UPSAMPLER_REPO} ships it (config, weights, tokenizer and preprocessor_config.json)"
        )
    try:
        model_type = json.loads((folder / "config.json").read_text("utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"--prompt-upsampler {source}: {folder / 'config.json'} is not a JSON object"
        ) from err
    if model_type != UPSAMPLER_MODEL_TYPE:
        raise CheckpointError(
            f"--prompt-upsampler {source}: {folder / 'config.json'} says model_type {model_type!r}, not "
            f"{UPSAMPLER_MODEL_TYPE!r}; the FLUX 3 upsampler is a Qwen3.5 model ({UPSAMPLER_REPO})"
        )
    return folder
