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

from klein_agent.loading import keymaps
from klein_agent.loading.errors import CheckpointError
from klein_agent.loading.hub import completion_hint
from klein_agent.loading.quantized import Fp8LinearFactory, QuantizedSummary, to_model_names
from klein_agent.loading.safetensors_file import DTYPES
from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import (
    BASE_SAMPLING,
    DISTILLED_SAMPLING,
    PRESETS,
    AutoencoderConfig,
    SamplingDefaults,
    SchedulerConfig,
    TransformerConfig,
)
from klein_agent.model.text_encoder import (
    TextEmbedder,
    TextEncoderTooShallowError,
    checkpoint_key,
    skipped_checkpoint_key,
)
from klein_agent.model.transformer import Flux2Transformer

FOLDER_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")
# klein 9B-KV: diffusers names its own pipeline class in model_index.json; BFL's single file holds the same tensors
# as the 9B (no marker inside), so its published name is the only sign (flux-2-klein-9b-kv[-fp8].safetensors)
KV_PIPELINE_CLASS = "Flux2KleinKVPipeline"
_KV_FILE = re.compile(r"klein-9b-kv", re.IGNORECASE)


@dataclass
class Components:
    """The loaded parts of one model, with the sampling defaults, preset name and schedule its files imply."""

    transformer: Flux2Transformer
    autoencoder: AutoEncoder
    text_embedder: TextEmbedder
    sampling: SamplingDefaults
    variant: str
    scheduler: SchedulerConfig
    kv_references: bool = False  # klein 9B-KV: references run once, their keys and values kept
    quantized: QuantizedSummary | None = None  # a BFL fp8r/nvfp4 transformer: what loading did with it


# ------------------------------------------------------------------------------------------------ loading


def load_components(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    transformer_file: str | os.PathLike[str] | None = None,
    text_encoder_device: torch.device | None = None,
    fp8_linear: Fp8LinearFactory | None = None,
) -> Components:
    """Load a diffusers-layout model folder onto `device` in `dtype`.

    `text_encoder_device` puts the text encoder elsewhere (the host, for --offload-text-encoder): its weights are
    read straight onto it and never pass through `device`.

    `transformer_file` replaces the folder's transformer with a BFL single file. Distilled or not comes from
    `model_index.json` (`is_distilled`); a KV checkpoint (`is_kv_checkpoint`) is distilled, as diffusers'
    `Flux2KleinKVPipeline` is (the distilled defaults: few steps, no guidance). A transformer quantized by BFL
    (fp8r, nvfp4: `loading.quantized`) is dequantized to `dtype`, except the fp8r layers `fp8_linear` takes. Raises CheckpointError when a part is missing, unreadable
    or does not fit, and when the text encoder and the transformer come from different model sizes.
    """
    folder = Path(folder)
    index = _read_json(folder / "model_index.json", "the model folder's index")
    missing = [part for part in FOLDER_PARTS if not (folder / part).is_dir()]
    if transformer_file and "transformer" in missing:
        missing.remove("transformer")
    if missing:
        raise CheckpointError(f"{folder} lacks the folder(s) {', '.join(missing)} of the diffusers layout")
    kv = is_kv_checkpoint(index, transformer_file)
    sampling = DISTILLED_SAMPLING if kv or index.get("is_distilled", False) else BASE_SAMPLING
    scheduler = load_scheduler_config(folder / "scheduler")

    if transformer_file:
        transformer, quantized = load_bfl_transformer(Path(transformer_file), device, dtype, fp8_linear)
    else:
        transformer, quantized = load_diffusers_transformer(folder / "transformer", device, dtype, fp8_linear)
    autoencoder = load_autoencoder(folder / "vae", device, dtype)
    text_embedder = load_text_embedder(
        folder / "text_encoder", folder / "tokenizer", text_encoder_device or device, dtype
    )
    if text_embedder.output_dim != transformer.config.context_in_dim:
        raise CheckpointError(
            f"the text encoder gives {text_embedder.output_dim}-dim features but the transformer expects "
            f"{transformer.config.context_in_dim}: the two come from different models (klein 4B pairs with Qwen3-4B, "
            "9B with Qwen3-8B)"
        )
    variant = detect_variant(transformer.config, sampling, kv)
    return Components(transformer, autoencoder, text_embedder, sampling, variant, scheduler, kv, quantized)


def is_kv_checkpoint(
    index: Mapping[str, Any], transformer_file: str | os.PathLike[str] | None = None
) -> bool:
    """Whether a model runs klein 9B-KV's reference semantics: its `model_index.json` names diffusers'
    `Flux2KleinKVPipeline`, or its BFL single file has the KV checkpoint's published name."""
    if index.get("_class_name") == KV_PIPELINE_CLASS:
        return True
    return transformer_file is not None and bool(_KV_FILE.search(Path(transformer_file).name))


def detect_variant(config: TransformerConfig, sampling: SamplingDefaults, kv: bool = False) -> str:
    """The preset whose transformer shape, distillation and reference semantics match the checkpoint's
    ("klein-4b", "klein-base-9b", "klein-9b-kv", "tiny", ...); an undistilled copy of a distilled-only preset
    gets "-base", a KV copy of a preset without KV "-kv"; any other shape is "custom" (or "custom-kv")."""
    shape_matches = [name for name, p in PRESETS.items() if p.transformer == config]
    for name in shape_matches:
        p = PRESETS[name]
        if p.sampling.distilled == sampling.distilled and p.kv_references == kv:
            return name
    if shape_matches:
        name = shape_matches[0]
        suffix = "-kv" if kv else ("-base" if not sampling.distilled else "")
        return f"{name}{suffix}"
    return "custom-kv" if kv else "custom"


def load_scheduler_config(folder: Path) -> SchedulerConfig:
    """The schedule fields of `scheduler/scheduler_config.json` (klein's defaults when the folder has none).

    Raises CheckpointError for a scheduler that changes the sampler itself, which klein-agent does not run."""
    path = folder / "scheduler_config.json"
    if not path.exists():
        return SchedulerConfig()
    cfg = _read_json(path, "the scheduler config")
    name = cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    unsupported = [
        key
        for key in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
        )
        if cfg.get(key)
    ]
    if name != "FlowMatchEulerDiscreteScheduler" or unsupported:
        what = f"{name} with {', '.join(unsupported)}" if unsupported else name
        raise CheckpointError(
            f"{path}: the scheduler is {what}; klein-agent runs FLUX.2 [klein]'s flow-matching Euler schedule only"
        )
    try:
        shift_type = str(cfg.get("time_shift_type", "exponential"))
        if shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type {shift_type!r}")
        terminal = cfg.get("shift_terminal")
        return SchedulerConfig(
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            use_dynamic_shifting=bool(cfg.get("use_dynamic_shifting", False)),
            time_shift_type=shift_type,
            shift=float(cfg.get("shift", 1.0)),
            shift_terminal=None if terminal is None else float(terminal),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable scheduler config ({err})") from err


def load_diffusers_transformer(
    folder: Path, device: torch.device, dtype: torch.dtype, fp8_linear: Fp8LinearFactory | None = None
) -> tuple[Flux2Transformer, QuantizedSummary | None]:
    """The transformer of a diffusers `transformer/` folder, its sizes from its config.json, and what was done
    with its BFL-quantized layers if it has any (see `load_transformer_files`).

    Raises CheckpointError for an unusable config, a guidance embedding (FLUX.2 [dev]) or weights that do not
    fit.
    """
    cfg = _read_json(folder / "config.json", "the transformer config")
    # Absent keys take the defaults of diffusers' Flux2Transformer2DModel, as from_pretrained would.
    try:
        heads, head_dim = int(cfg.get("num_attention_heads", 48)), int(cfg.get("attention_head_dim", 128))
        in_channels = int(cfg.get("in_channels", 128))
        out_channels = cfg.get("out_channels")
        if int(cfg.get("patch_size", 1)) != 1:
            raise ValueError(f"patch_size {cfg.get('patch_size')} (klein's is 1)")
        if out_channels is not None and int(out_channels) != in_channels:
            raise ValueError(f"out_channels {out_channels} differs from in_channels {in_channels}")
        config = TransformerConfig(
            in_channels=in_channels,
            context_in_dim=int(cfg.get("joint_attention_dim", 15360)),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=int(cfg.get("num_layers", 8)),
            depth_single_blocks=int(cfg.get("num_single_layers", 48)),
            mlp_ratio=float(cfg.get("mlp_ratio", 3.0)),
            axes_dim=tuple(int(a) for a in cfg.get("axes_dims_rope", (32, 32, 32, 32))),
            theta=int(cfg.get("rope_theta", 2000)),
            eps=float(cfg.get("eps", 1e-6)),
            timestep_channels=int(cfg.get("timestep_guidance_channels", 256)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: unusable transformer config ({err})") from err
    if cfg.get("guidance_embeds", True):
        raise CheckpointError(f"{folder} has a guidance embedding: that is FLUX.2 [dev], not [klein]")
    return load_transformer_files(
        _weight_files(folder),
        str(folder),
        lambda _: config,
        keymaps.transformer_from_diffusers,
        device,
        dtype,
        fp8_linear,
    )


def load_bfl_transformer(
    path: Path, device: torch.device, dtype: torch.dtype, fp8_linear: Fp8LinearFactory | None = None
) -> tuple[Flux2Transformer, QuantizedSummary | None]:
    """The transformer of a BFL single safetensors file (keys with or without `model.diffusion_model.`), its sizes
    inferred from the tensor shapes, and what was done with its quantized layers (see `load_transformer_files`).

    Raises CheckpointError when the file is missing or unreadable or is not a klein transformer.
    """
    if not path.is_file():
        raise CheckpointError(f"transformer file {path} does not exist")
    return load_transformer_files(
        [path],
        str(path),
        lambda state: infer_transformer_config(state, str(path)),
        keymaps.strip_prefix,
        device,
        dtype,
        fp8_linear,
    )


def load_transformer_files(
    files: list[Path],
    where: str,
    config_for: Callable[[Mapping[str, Tensor]], TransformerConfig],
    rename: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    fp8_linear: Fp8LinearFactory | None,
) -> tuple[Flux2Transformer, QuantizedSummary | None]:
    """Header first, data second: the whole conversion (quantized layers, `rename`, `config_for`, the fit) runs on
    the shapes and dtypes the files declare, as meta tensors; only a state that fits the model is read. So a file
    declaring a tensor the model has no room for, or a scale of the wrong shape, costs no memory.

    Quantized layers (`loading.quantized`) are dequantized to `dtype`, or kept in FP8 as the modules `fp8_linear`
    makes. Raises CheckpointError naming `where` and the keys.
    """
    declared, _, _ = to_model_names(read_headers(files), rename, dtype, where)
    with torch.device("meta"):
        model = Flux2Transformer(config_for(declared))
    check_fits(model, declared, where)
    state, modules, summary = to_model_names(
        read_safetensors(files, device), rename, dtype, where, fp8_linear
    )
    stored: set[str] = set()
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        for key, tensor in module.state_dict().items():
            state[f"{name}.{key}"] = tensor
            stored.add(f"{name}.{key}")
    return load_strict(model, state, device, dtype, where, as_stored=stored), summary


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
    try:
        return TransformerConfig(
            in_channels=in_channels,
            context_in_dim=context_in_dim,
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            mlp_ratio=mlp_hidden / hidden,
            axes_dim=(axis, axis, axis, axis),
            timestep_channels=state["time_in.in_layer.weight"].shape[1],
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"{where}: its tensor shapes do not make a FLUX.2 transformer ({err})"
        ) from None


def load_autoencoder(folder: Path, device: torch.device, dtype: torch.dtype) -> AutoEncoder:
    """The autoencoder of a diffusers `vae/` folder (diffusers `AutoencoderKLFlux2` config and weights).

    Raises CheckpointError for a config klein's autoencoder cannot follow (other block types, activation or
    patch size) or weights that do not fit.
    """
    cfg = _read_json(folder / "config.json", "the autoencoder config")
    # Absent keys take the defaults of diffusers' AutoencoderKLFlux2, as from_pretrained would.
    try:
        channels = tuple(int(c) for c in cfg.get("block_out_channels", (128, 256, 512, 512)))
        decoder = cfg.get("decoder_block_out_channels")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            kinds = cfg.get(key, [want] * len(channels))
            if len(kinds) != len(channels) or any(kind != want for kind in kinds):
                raise ValueError(
                    f"{key} {kinds} (klein's autoencoder has only {want} levels, one per channel)"
                )
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"act_fn {cfg.get('act_fn')!r} (klein's is silu)")
        if [int(p) for p in cfg.get("patch_size", (2, 2))] != [2, 2]:
            raise ValueError(f"patch_size {cfg.get('patch_size')} (klein's latents are 2x2 patches)")
        config = AutoencoderConfig(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            block_out_channels=channels,
            decoder_block_out_channels=None if decoder is None else tuple(int(c) for c in decoder),
            num_res_blocks=int(cfg.get("layers_per_block", 2)),
            z_channels=int(cfg.get("latent_channels", 32)),
            norm_groups=int(cfg.get("norm_num_groups", 32)),
            bn_eps=float(cfg.get("batch_norm_eps", 1e-4)),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_attention=bool(cfg.get("mid_block_add_attention", True)),
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
    """The Qwen3 encoder of `folder` with the tokenizer of `tokenizer_folder`; layers past 27 stay unread.

    Raises CheckpointError when the encoder is not Qwen3, has fewer than 27 layers, its tokenizer does not
    load, or its weights do not fit.
    """
    cfg = _read_json(folder / "config.json", "the text encoder config")
    if cfg.get("model_type") != "qwen3":
        raise CheckpointError(f"{folder} holds a {cfg.get('model_type')!r} model; FLUX.2 [klein] uses Qwen3")
    config = Qwen3Config.from_dict(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer from {tokenizer_folder}: {err}") from err
    try:
        with torch.device("meta"):
            embedder = TextEmbedder(config, tokenizer)
    except TextEncoderTooShallowError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    kept = embedder.output_layers[-1]
    keep_norm = embedder.final_norm_on_last
    raw = read_safetensors(
        _weight_files(folder), device, keep=lambda key: not skipped_checkpoint_key(key, kept, keep_norm)
    )
    expected = {checkpoint_key(k) for k in embedder.model.state_dict() if not k.startswith("rotary_emb.")}
    state = {}
    for key, value in raw.items():
        state[key.removeprefix("model.") if key in expected else key] = value  # unknown keys keep their names
    embedder.model = load_strict(embedder.model, state, device, dtype, str(folder))
    embedder.reset_rotary(device)
    return embedder


def read_headers(files: Iterable[Path]) -> dict[str, Tensor]:
    """Every tensor of the files as declared, with no data read: empty meta tensors of the header's shapes and
    dtypes. Raises CheckpointError for an unreadable file or a dtype torch has no name for."""
    out: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    declared = handle.get_slice(key)
                    name = declared.get_dtype()
                    if name not in DTYPES:
                        raise CheckpointError(
                            f"{file}, key {key!r}: dtype {name} is not one a checkpoint tensor can have "
                            f"({', '.join(DTYPES)})"
                        )
                    out[key] = torch.empty(declared.get_shape(), dtype=DTYPES[name], device="meta")
        except (OSError, RuntimeError, ValueError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {file}: {err}") from err
    return out


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
    as_stored: Iterable[str] = (),
) -> Any:
    """Assign `state` to a meta-device `model`, cast to `dtype` on `device`; refuse anything that does not fit.
    The keys in `as_stored` (FP8 weights and their scales) keep their dtype."""
    check_fits(model, state, where)
    keep = set(as_stored)
    # Every floating tensor in `dtype`, the autoencoder's batch-norm statistics too: diffusers loads them in the
    # pipeline dtype, and the latent normalisation is computed from them in that precision.
    cast = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and k not in keep else v.to(device))
        for k, v in state.items()
    }
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval()


def check_fits(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected, mis-shaped or non-floating key of `state` for
    `model` (real or meta tensors alike: only shapes and dtypes are compared)."""
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


def _listing(what: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what}: {shown}{more}"


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder, through its shard index when there is one.

    Raises CheckpointError "incomplete download" when a shard the index lists, or a numbered shard
    (`-0000k-of-0000n`), is missing, or a file is a link to nothing (an interrupted Hugging Face download)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = _read_json(indexes[0], "the shard index").get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise _incomplete(folder, f"shard(s) {', '.join(absent)} listed in {indexes[0].name} are missing")
        return files
    entries = sorted(folder.glob("*.safetensors"))
    dangling = [f.name for f in entries if f.is_symlink() and not f.exists()]
    if dangling:
        raise _incomplete(folder, f"{', '.join(dangling)} link(s) to a file that is missing")
    groups: dict[tuple[str, int], set[int]] = {}
    for f in entries:
        m = _SHARD.match(f.name)
        if m:
            groups.setdefault((m["stem"], int(m["total"])), set()).add(int(m["index"]))
    for (stem, total), present in groups.items():
        absent_shards = [i for i in range(1, total + 1) if i not in present]
        if absent_shards:
            names = ", ".join(f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in absent_shards)
            raise _incomplete(folder, f"{names} missing (and the shard index too)")
    if not entries:
        raise CheckpointError(f"{folder} has no .safetensors weights")
    return entries


def _incomplete(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(f"incomplete download: {folder}: {what}; {completion_hint(folder)}")


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
