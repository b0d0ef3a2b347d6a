"""Write a random FLUX.2 [klein] checkpoint in the layouts the real ones ship in.

    python tools/make_tiny_checkpoint.py OUT_DIR [--preset tiny] [--seed 0] [--shards 2] [--base]

OUT_DIR gets the diffusers layout of the official Hugging Face repos (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/) and, beside it, the BFL single-file transformer OUT_DIR/flux-2-klein.safetensors.
The weights are those of `klein_agent.loading.random_init.build_random_models(preset, seed)`, so `--model OUT_DIR` and
`--model tiny` give the same pictures. diffusers can load the folder too (the parity tests do).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3ForCausalLM

from klein_agent.loading import keymaps
from klein_agent.loading.random_init import build_random_models
from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import preset
from klein_agent.model.text_encoder import TextEmbedder
from klein_agent.model.transformer import Flux2Transformer

BFL_FILE = "flux-2-klein.safetensors"
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


def write_checkpoint(
    folder: Path,
    transformer: Flux2Transformer,
    autoencoder: AutoEncoder,
    text_embedder: TextEmbedder,
    *,
    distilled: bool = True,
    shards: int = 1,
    seed: int = 0,
) -> Path:
    """Write all components; returns the path of the BFL single-file transformer."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "Flux2KleinPipeline",
        "_diffusers_version": "0.37.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    if distilled:
        index["is_distilled"] = True
    _write_json(folder / "model_index.json", index)
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)

    tc = transformer.config
    _write_json(
        folder / "transformer" / "config.json",
        {
            "_class_name": "Flux2Transformer2DModel",
            "attention_head_dim": tc.head_dim,
            "axes_dims_rope": list(tc.axes_dim),
            "eps": tc.eps,
            "guidance_embeds": False,
            "in_channels": tc.in_channels,
            "joint_attention_dim": tc.context_in_dim,
            "mlp_ratio": tc.mlp_ratio,
            "num_attention_heads": tc.num_heads,
            "num_layers": tc.depth,
            "num_single_layers": tc.depth_single_blocks,
            "out_channels": None,
            "patch_size": 1,
            "rope_theta": tc.theta,
            "timestep_guidance_channels": tc.timestep_channels,
        },
    )
    ours = _contiguous(transformer.state_dict())
    _save_sharded(
        keymaps.transformer_to_diffusers(ours), folder / "transformer", "diffusion_pytorch_model", shards
    )
    bfl_file = folder / BFL_FILE
    save_file(ours, str(bfl_file))

    ac = autoencoder.config
    levels = len(ac.block_out_channels)
    _write_json(
        folder / "vae" / "config.json",
        {
            "_class_name": "AutoencoderKLFlux2",
            "act_fn": "silu",
            "batch_norm_eps": ac.bn_eps,
            "batch_norm_momentum": 0.1,
            "block_out_channels": list(ac.block_out_channels),
            "decoder_block_out_channels": None
            if ac.decoder_block_out_channels is None
            else list(ac.decoder_block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "in_channels": ac.in_channels,
            "out_channels": ac.out_channels,
            "latent_channels": ac.z_channels,
            "layers_per_block": ac.num_res_blocks,
            "norm_num_groups": ac.norm_groups,
            "mid_block_add_attention": ac.mid_attention,
            "patch_size": [2, 2],
            "sample_size": 1024,
            "use_quant_conv": ac.use_quant_conv,
            "use_post_quant_conv": ac.use_post_quant_conv,
        },
    )
    vae_state = keymaps.autoencoder_to_diffusers(_contiguous(autoencoder.state_dict()))
    _save_sharded(vae_state, folder / "vae", "diffusion_pytorch_model", 1)

    # The embedder holds only the layers it uses; a real encoder checkpoint has them all, plus the final norm.
    full_config = text_embedder.full_config
    torch.manual_seed(seed)
    full = Qwen3ForCausalLM(full_config).eval()
    kept = {k: v for k, v in text_embedder.model.state_dict().items() if not k.startswith("rotary_emb.")}
    _missing, unexpected = full.model.load_state_dict(kept, strict=False)
    assert not unexpected, unexpected
    full.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    text_embedder.tokenizer.save_pretrained(str(folder / "tokenizer"))
    return bfl_file


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if shards <= 1:
        save_file(state, str(folder / f"{stem}.safetensors"))
        return
    keys = sorted(state)
    per_shard = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(
        folder / f"{stem}.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="split the transformer weights into N files")
    parser.add_argument("--base", action="store_true", help="mark it a Base (undistilled, CFG) model")
    args = parser.parse_args(argv)
    transformer, autoencoder, text = build_random_models(preset(args.preset), args.seed)
    bfl = write_checkpoint(
        args.out, transformer, autoencoder, text, distilled=not args.base, shards=args.shards, seed=args.seed
    )
    print(f"wrote {args.out} (diffusers layout) and {bfl} (BFL single file)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
