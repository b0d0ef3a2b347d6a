"""Finding and loading checkpoints: diffusers-layout folders, Hugging Face repo ids, BFL single files.

Every size comes from the checkpoint itself (config.json files or tensor shapes). Modules are built on the meta
device and the tensors are loaded straight to the target device and dtype. Loading is strict: a missing, unexpected
or mis-shaped key is an error that names the keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoTokenizer, Qwen3Config

from klein_agent import keymaps
from klein_agent.autoencoder import AutoEncoder
from klein_agent.configs import AutoencoderConfig, SamplingDefaults, TransformerConfig
from klein_agent.text_encoder import TextEmbedder, checkpoint_key, skipped_checkpoint_key
from klein_agent.transformer import Flux2Transformer

FOLDER_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
BASE_SAMPLING = SamplingDefaults(distilled=False, steps=50, guidance=4.0)
DISTILLED_SAMPLING = SamplingDefaults(distilled=True, steps=4, guidance=1.0)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message says what is wrong and where."""


@dataclass
class Components:
    transformer: Flux2Transformer
    autoencoder: AutoEncoder
    text_embedder: TextEmbedder
    sampling: SamplingDefaults
    variant: str


# ------------------------------------------------------------------------------------------------ finding a model


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
            f"(`huggingface-cli download {model}`), pass a local folder, or add --allow-download."
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub ships with transformers
        raise CheckpointError("downloading needs huggingface_hub: pip install 'klein-agent[hub]'") from err
    return Path(snapshot_download(model))


def hub_cache_dir() -> Path:
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


# ------------------------------------------------------------------------------------------------ loading


def load_components(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    transformer_file: str | os.PathLike[str] | None = None,
) -> Components:
    folder = Path(folder)
    index = _read_json(folder / "model_index.json", "the model folder's index")
    missing = [part for part in FOLDER_PARTS if not (folder / part).is_dir()]
    if transformer_file and "transformer" in missing:
        missing.remove("transformer")
    if missing:
        raise CheckpointError(f"{folder} lacks the folder(s) {', '.join(missing)} of the diffusers layout")
    sampling = DISTILLED_SAMPLING if index.get("is_distilled", False) else BASE_SAMPLING

    if transformer_file:
        transformer = load_bfl_transformer(Path(transformer_file), device, dtype)
    else:
        transformer = load_diffusers_transformer(folder / "transformer", device, dtype)
    autoencoder = load_autoencoder(folder / "vae", device, dtype)
    text_embedder = load_text_embedder(folder / "text_encoder", folder / "tokenizer", device, dtype)
    if text_embedder.output_dim != transformer.config.context_in_dim:
        raise CheckpointError(
            f"the text encoder gives {text_embedder.output_dim}-dim features but the transformer expects "
            f"{transformer.config.context_in_dim}: the two come from different models (klein 4B pairs with Qwen3-4B, "
            "9B with Qwen3-8B)"
        )
    size = "9b" if transformer.config.hidden_size >= 4096 else "4b"
    variant = f"klein-{size}" if sampling.distilled else f"klein-base-{size}"
    return Components(transformer, autoencoder, text_embedder, sampling, variant)


def load_diffusers_transformer(folder: Path, device: torch.device, dtype: torch.dtype) -> Flux2Transformer:
    cfg = _read_json(folder / "config.json", "the transformer config")
    try:
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        config = TransformerConfig(
            in_channels=int(cfg["in_channels"]),
            context_in_dim=int(cfg["joint_attention_dim"]),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=int(cfg["num_layers"]),
            depth_single_blocks=int(cfg["num_single_layers"]),
            mlp_ratio=float(cfg.get("mlp_ratio", 3.0)),
            axes_dim=tuple(int(a) for a in cfg.get("axes_dims_rope", (32, 32, 32, 32))),
            theta=int(cfg.get("rope_theta", 2000)),
            eps=float(cfg.get("eps", 1e-6)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: unusable transformer config ({err})") from err
    if cfg.get("guidance_embeds"):
        raise CheckpointError(f"{folder} has a guidance embedding: that is FLUX.2 [dev], not [klein]")
    state = keymaps.transformer_from_diffusers(read_safetensors(_weight_files(folder), device))
    with torch.device("meta"):
        model = Flux2Transformer(config)
    return load_strict(model, state, device, dtype, str(folder))


def load_bfl_transformer(path: Path, device: torch.device, dtype: torch.dtype) -> Flux2Transformer:
    if not path.is_file():
        raise CheckpointError(f"transformer file {path} does not exist")
    state = keymaps.strip_prefix(read_safetensors([path], device))
    config = infer_transformer_config(state, str(path))
    with torch.device("meta"):
        model = Flux2Transformer(config)
    return load_strict(model, state, device, dtype, str(path))


def infer_transformer_config(state: Mapping[str, Tensor], where: str) -> TransformerConfig:
    """Sizes from a BFL single file's tensor shapes (it carries no config)."""
    try:
        hidden, in_channels = state["img_in.weight"].shape
        context_in_dim = state["txt_in.weight"].shape[1]
        head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        mlp_hidden = state["double_blocks.0.img_mlp.2.weight"].shape[1]
    except KeyError as err:
        raise CheckpointError(f"{where} is not a FLUX.2 transformer: it has no {err.args[0]!r}") from None
    if "guidance_in.in_layer.weight" in state:
        raise CheckpointError(f"{where} has a guidance embedding: that is FLUX.2 [dev], not [klein]")
    depth = _count_blocks(state, "double_blocks.")
    depth_single = _count_blocks(state, "single_blocks.")
    axis = head_dim // 4
    return TransformerConfig(
        in_channels=in_channels,
        context_in_dim=context_in_dim,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        mlp_ratio=mlp_hidden / hidden,
        axes_dim=(axis, axis, axis, axis),
    )


def load_autoencoder(folder: Path, device: torch.device, dtype: torch.dtype) -> AutoEncoder:
    cfg = _read_json(folder / "config.json", "the autoencoder config")
    try:
        channels = [int(c) for c in cfg["block_out_channels"]]
        config = AutoencoderConfig(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            ch=channels[0],
            ch_mult=tuple(c // channels[0] for c in channels),
            num_res_blocks=int(cfg.get("layers_per_block", 2)),
            z_channels=int(cfg["latent_channels"]),
            norm_groups=int(cfg.get("norm_num_groups", 32)),
            bn_eps=float(cfg.get("batch_norm_eps", 1e-4)),
        )
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: unusable autoencoder config ({err})") from err
    state = keymaps.autoencoder_from_diffusers(read_safetensors(_weight_files(folder), device))
    with torch.device("meta"):
        model = AutoEncoder(config)
    return load_strict(model, state, device, dtype, str(folder))


def load_text_embedder(
    folder: Path, tokenizer_folder: Path, device: torch.device, dtype: torch.dtype
) -> TextEmbedder:
    cfg = _read_json(folder / "config.json", "the text encoder config")
    if cfg.get("model_type") != "qwen3":
        raise CheckpointError(f"{folder} holds a {cfg.get('model_type')!r} model; FLUX.2 [klein] uses Qwen3")
    config = Qwen3Config.from_dict(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer from {tokenizer_folder}: {err}") from err
    with torch.device("meta"):
        embedder = TextEmbedder(config, tokenizer)
    kept = embedder.output_layers[-1]
    raw = read_safetensors(
        _weight_files(folder), device, keep=lambda key: not skipped_checkpoint_key(key, kept)
    )
    expected = {checkpoint_key(k) for k in embedder.model.state_dict() if not k.startswith("rotary_emb.")}
    state = {}
    for key, value in raw.items():
        state[key.removeprefix("model.") if key in expected else key] = value  # unknown keys keep their names
    embedder.model = load_strict(embedder.model, state, device, dtype, str(folder))
    embedder.reset_rotary(device)
    return embedder


def read_safetensors(
    files: Iterable[Path], device: torch.device, keep: Callable[[str], bool] | None = None
) -> dict[str, Tensor]:
    """Every tensor of the files, placed on `device` as stored; `keep(key)` filters before reading."""
    out: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if keep is None or keep(key):
                        out[key] = handle.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot read {file}: {err}") from err
    return out


def load_strict(
    model: nn.Module,
    state: Mapping[str, Tensor],
    device: torch.device,
    dtype: torch.dtype,
    where: str,
) -> Any:
    """Assign `state` to a meta-device `model`, cast to `dtype` on `device`; refuse anything that does not fit."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    )
    wrong_dtype = sorted(
        f"{k} ({state[k].dtype})"
        for k in state
        if k in expected and expected[k].is_floating_point() and not state[k].is_floating_point()
    )
    problems = [
        _listing("missing keys", missing),
        _listing("unexpected keys", unexpected),
        _listing("mis-shaped tensors", wrong_shape),
        _listing("non-floating-point weights", wrong_dtype),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{where} does not fit {type(model).__name__}: " + "; ".join(problems))
    cast = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        for k, v in state.items()
    }
    for name, buffer in model.named_buffers():
        if name in cast and name.startswith("bn.") and buffer.is_floating_point():
            cast[name] = state[name].to(device=device, dtype=torch.float32)  # statistics keep full precision
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval()


def _listing(what: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what}: {shown}{more}"


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder, through its shard index when there is one."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = _read_json(indexes[0], "the shard index").get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(
                f"{folder}: shard(s) {', '.join(absent)} listed in {indexes[0].name} are missing"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no .safetensors weights")
    return files


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} is not a JSON object")
    return data


def _count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0
