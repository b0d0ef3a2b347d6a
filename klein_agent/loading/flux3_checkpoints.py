"""Loading FLUX 3 [klein]: a diffusers modular-pipeline folder, or BFL's single-file transformer.

A FLUX 3 folder has `modular_model_index.json` (no `model_index.json`) naming `Flux3DistilledModularPipeline` or
`Flux3ModularPipeline`. diffusers writes the absolute path of the folder it saved into each component's entry; we
resolve every component by its `subfolder` under the folder we were given, so a copied or moved folder (or a Hugging
Face snapshot) loads. The autoencoder is FLUX.2's (`AutoencoderKLFlux2`) and loads through the same code. The text
encoder is Qwen3-VL: only its text tower (`model.language_model.*`) is read; the vision tower and the LM head are
not part of prompt conditioning and stay unread. Loading is strict everywhere else: missing, unexpected or
mis-shaped keys are named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Qwen3Config

from klein_agent.loading import flux3_keymaps, keymaps
from klein_agent.loading.checkpoints import (
    _read_json,
    _weight_files,
    load_autoencoder,
    load_strict,
    read_safetensors,
)
from klein_agent.loading.errors import CheckpointError
from klein_agent.loading.hub import MODULAR_INDEX, completion_hint
from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import (
    FLUX3_BASE_SAMPLING,
    FLUX3_DISTILLED_SAMPLING,
    FLUX3_SCHEDULER,
    PRESETS,
    Flux3TransformerConfig,
    SamplingDefaults,
    SchedulerConfig,
)
from klein_agent.model.flux3_text_encoder import Flux3TextEmbedder
from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.model.text_encoder import TextEncoderTooShallowError

# the pipeline class diffusers writes -> whether it is the distilled (flow-map) model
PIPELINE_CLASSES = {"Flux3DistilledModularPipeline": True, "Flux3ModularPipeline": False}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
_TEXT_PREFIX = "model.language_model."
_UNREAD_TEXT_PREFIXES = ("model.visual.", "lm_head.")  # Qwen3-VL's vision tower and LM head
# QK norms stay float32 whatever the model dtype (diffusers `_keep_in_fp32_modules = ["norm_q", "norm_k"]`)
_FLOAT32_SUFFIXES = (".norm.query_norm.scale", ".norm.key_norm.scale")


@dataclass
class Flux3Components:
    """The loaded parts of one FLUX 3 model, its sampling defaults, preset name and schedule."""

    transformer: Flux3Transformer
    autoencoder: AutoEncoder
    text_embedder: Flux3TextEmbedder
    sampling: SamplingDefaults
    variant: str
    scheduler: SchedulerConfig = FLUX3_SCHEDULER


def is_flux3_folder(folder: Path) -> bool:
    """Whether `folder` is a FLUX 3 modular-pipeline folder (it has `modular_model_index.json`)."""
    return (Path(folder) / MODULAR_INDEX).is_file()


def load_flux3_components(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    transformer_file: str | Path | None = None,
    text_encoder_device: torch.device | None = None,
) -> Flux3Components:
    """Load a FLUX 3 modular-pipeline folder onto `device` in `dtype`; `transformer_file` replaces its transformer
    with a BFL single file.

    Raises CheckpointError when the index names another pipeline, a component folder is missing, a part does not
    load or fit, or the transformer's kind (flow map or not) contradicts the index.
    """
    folder = Path(folder)
    index = _read_json(folder / MODULAR_INDEX, "the FLUX 3 model index")
    pipeline_class = index.get("_class_name")
    if pipeline_class not in PIPELINE_CLASSES:
        raise CheckpointError(
            f"{folder / MODULAR_INDEX} names the pipeline {pipeline_class!r}; klein-agent runs FLUX 3 [klein] "
            f"({' or '.join(PIPELINE_CLASSES)})"
        )
    distilled = PIPELINE_CLASSES[pipeline_class]
    parts = {name: component_folder(folder, index, name) for name in COMPONENTS}
    if transformer_file:
        transformer = load_bfl_flux3_transformer(Path(transformer_file), device, dtype)
    else:
        transformer = load_diffusers_flux3_transformer(parts["transformer"], device, dtype)
    if transformer.config.flow_map != distilled:
        kind = "a flow map (distilled)" if transformer.config.flow_map else "not a flow map (Base)"
        raise CheckpointError(
            f"{folder / MODULAR_INDEX} names {pipeline_class}, but its transformer is {kind}: the two come from "
            "different FLUX 3 models; use the transformer of the same download"
        )
    autoencoder = load_autoencoder(parts["vae"], device, dtype)
    text = load_flux3_text_embedder(
        parts["text_encoder"], parts["tokenizer"], text_encoder_device or device, dtype
    )
    if text.output_dim != transformer.config.context_in_dim:
        raise CheckpointError(
            f"the text encoder gives {text.output_dim}-dim features but the transformer expects "
            f"{transformer.config.context_in_dim}: the two come from different models"
        )
    sampling = FLUX3_DISTILLED_SAMPLING if distilled else FLUX3_BASE_SAMPLING
    return Flux3Components(transformer, autoencoder, text, sampling, detect_flux3_variant(transformer.config))


def component_folder(folder: Path, index: dict[str, Any], name: str) -> Path:
    """Where component `name` lives: its `subfolder` under `folder` (diffusers' saved absolute path is ignored, so
    a moved folder loads). Raises CheckpointError naming the component when the folder is not there."""
    entry = index.get(name)
    subfolder = name
    if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], dict):
        subfolder = entry[2].get("subfolder") or name
    path = folder / str(subfolder)
    if not path.is_dir():
        raise CheckpointError(
            f"{folder} lacks the {name} folder {path.name}/ that {MODULAR_INDEX} names; {completion_hint(folder)}"
        )
    return path


def detect_flux3_variant(config: Flux3TransformerConfig) -> str:
    """The FLUX 3 preset whose transformer matches ("flux3-klein", "flux3-klein-base", "flux3-tiny", ...), else
    "flux3-custom"."""
    for name, p in PRESETS.items():
        if p.transformer == config:
            return name
    return "flux3-custom"


def load_diffusers_flux3_transformer(
    folder: Path, device: torch.device, dtype: torch.dtype
) -> Flux3Transformer:
    """The transformer of a diffusers `transformer/` folder (`Flux3Transformer2DModel`), sizes from its config.json.

    Absent keys take diffusers' defaults, as `from_pretrained` would. Raises CheckpointError for another class, an
    unusable config or weights that do not fit."""
    path = folder / "config.json"
    cfg = _read_json(path, "the transformer config")
    if cfg.get("_class_name", "Flux3Transformer2DModel") != "Flux3Transformer2DModel":
        raise CheckpointError(
            f"{path} describes a {cfg.get('_class_name')}, not FLUX 3's Flux3Transformer2DModel"
        )
    try:
        heads, head_dim = int(cfg.get("num_attention_heads", 24)), int(cfg.get("attention_head_dim", 128))
        config = Flux3TransformerConfig(
            in_channels=int(cfg.get("in_channels", 128)),
            cond_in_channels=int(cfg.get("cond_in_channels", 128)),
            context_in_dim=int(cfg.get("joint_attention_dim", 20480)),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=int(cfg.get("num_layers", 5)),
            depth_single_blocks=int(cfg.get("num_single_layers", 28)),
            mlp_ratio=float(cfg.get("mlp_ratio", 3.0)),
            axes_dim=tuple(int(a) for a in cfg.get("axes_dims_rope", (32, 32, 32, 32))),
            theta=int(cfg.get("rope_theta", 10000)),
            eps=float(cfg.get("eps", 1e-6)),
            timestep_channels=int(cfg.get("timestep_channels", 256)),
            flow_map=bool(cfg.get("flow_map", False)),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable FLUX 3 transformer config ({err})") from err
    state = flux3_keymaps.transformer_from_diffusers(read_safetensors(_weight_files(folder), device))
    return _load_transformer(config, state, device, dtype, str(folder))


def load_bfl_flux3_transformer(path: Path, device: torch.device, dtype: torch.dtype) -> Flux3Transformer:
    """BFL's single-file FLUX 3 transformer, with or without ComfyUI's `model.diffusion_model.` prefix, its sizes
    inferred from the tensor shapes (the file carries no config; RoPE theta is FLUX 3's 10000). Training-only REPA
    heads are dropped. Raises CheckpointError when the file is missing, unreadable or not a FLUX 3 transformer."""
    if not path.is_file():
        raise CheckpointError(f"transformer file {path} does not exist")
    state = flux3_keymaps.drop_training_only(keymaps.strip_prefix(read_safetensors([path], device)))
    return _load_transformer(infer_flux3_config(state, str(path)), state, device, dtype, str(path))


def infer_flux3_config(state: dict[str, torch.Tensor], where: str) -> Flux3TransformerConfig:
    """A FLUX 3 transformer's sizes from a BFL file's tensor shapes. Raises CheckpointError naming the key a FLUX 3
    transformer must have when it is absent."""
    try:
        hidden, in_channels = state["emb_in.image.weight"].shape
        cond_in = state["emb_in.image_cond.weight"].shape[1]
        context_in_dim = state["txt_in.weight"].shape[1]
        head_dim = state["single_blocks.0.norm.query_norm.scale"].shape[0]
        mlp_hidden = state["single_blocks.0.mlp_out.weight"].shape[1]
        timestep_channels = state["time_in.in_layer.weight"].shape[1]
    except KeyError as err:
        raise CheckpointError(
            f"{where} is not a FLUX 3 transformer: it has no {err.args[0]!r} (BFL's FLUX 3 names, with or "
            "without the model.diffusion_model. prefix)"
        ) from None
    axis = head_dim // 4
    try:
        return Flux3TransformerConfig(
            in_channels=in_channels,
            cond_in_channels=cond_in,
            context_in_dim=context_in_dim,
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=_count_blocks(state, "txt_mode_blocks."),
            depth_single_blocks=_count_blocks(state, "single_blocks."),
            mlp_ratio=mlp_hidden / hidden,
            axes_dim=(axis, axis, axis, axis),
            timestep_channels=timestep_channels,
            flow_map="ref_time_in.in_layer.weight" in state,
        )
    except ValueError as err:
        raise CheckpointError(
            f"{where}: its tensor shapes do not make a FLUX 3 transformer ({err})"
        ) from None


def _load_transformer(
    config: Flux3TransformerConfig,
    state: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    where: str,
) -> Flux3Transformer:
    with torch.device("meta"):
        model = Flux3Transformer(config)
    model = load_strict(model, state, device, dtype, where)
    # the QK norms' scales in float32, as diffusers keeps them (they are applied in float32 either way; a
    # bfloat16 copy would round them first)
    for key, value in state.items():
        if key.endswith(_FLOAT32_SUFFIXES):
            model.get_parameter(key).data = value.to(device=device, dtype=torch.float32)
    return model


def load_flux3_text_embedder(
    folder: Path, tokenizer_folder: Path, device: torch.device, dtype: torch.dtype
) -> Flux3TextEmbedder:
    """The text tower of a Qwen3-VL `text_encoder/` folder as a Qwen3 model, with the tokenizer of
    `tokenizer_folder` (loaded as a tokenizer: no torchvision). Layers past 32, the vision tower and the LM head
    stay unread. Raises CheckpointError when the encoder is not Qwen3-VL, is too shallow, uses a rope variant
    the text tower cannot be read as Qwen3 with, or its weights or tokenizer do not load."""
    path = folder / "config.json"
    cfg = _read_json(path, "the text encoder config")
    if cfg.get("model_type") != "qwen3_vl" or not isinstance(cfg.get("text_config"), dict):
        raise CheckpointError(
            f"{folder} holds a {cfg.get('model_type')!r} model; FLUX 3 [klein] uses Qwen3-VL"
        )
    config = qwen3_text_config(cfg["text_config"], str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer from {tokenizer_folder}: {err}") from err
    try:
        with torch.device("meta"):
            embedder = Flux3TextEmbedder(config, tokenizer)
    except TextEncoderTooShallowError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    kept, keep_norm = embedder.output_layers[-1], embedder.final_norm_on_last

    def wanted(key: str) -> bool:
        if key.startswith(_UNREAD_TEXT_PREFIXES):
            return False
        inner = key.removeprefix(_TEXT_PREFIX)
        if key.startswith(_TEXT_PREFIX) and inner == "norm.weight":
            return keep_norm
        parts = inner.split(".")
        return not (key.startswith(_TEXT_PREFIX) and parts[0] == "layers" and int(parts[1]) >= kept)

    raw = read_safetensors(_weight_files(folder), device, keep=wanted)
    state = {(k.removeprefix(_TEXT_PREFIX) if k.startswith(_TEXT_PREFIX) else k): v for k, v in raw.items()}
    embedder.model = load_strict(embedder.model, state, device, dtype, str(folder))
    embedder.reset_rotary(device)
    return embedder


def qwen3_text_config(text: dict[str, Any], where: str) -> Qwen3Config:
    """A Qwen3Config of Qwen3-VL's `text_config`: the same layers; M-RoPE becomes plain RoPE, which it equals for
    text (its three position rows are then the same). Raises CheckpointError for a rope type other than default."""
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = rope.get("rope_theta", text.get("rope_theta", 5_000_000.0))
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(
            f"{where}: rope type {rope.get('rope_type')!r}; FLUX 3's Qwen3-VL uses the default"
        )
    fields = {k: v for k, v in text.items() if k not in ("rope_parameters", "rope_scaling", "model_type")}
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    try:
        return Qwen3Config(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: unusable text_config ({err})") from err


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0
