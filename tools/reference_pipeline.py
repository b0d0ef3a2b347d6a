"""diffusers' FLUX.2 [klein] components with our sizes, for the benchmark and for writing test checkpoints.

`reference_pipeline(pipe)` gives tools/bench.py a `Flux2KleinPipeline` on the weights of one of ours (speed does not
depend on where the weights came from). Parity tests never use it: they load checkpoints diffusers itself wrote
(tests/reference_checkpoints.py). diffusers is a test dependency only, never imported by the package.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from transformers import Qwen3ForCausalLM

from klein_agent.loading import keymaps
from klein_agent.model.configs import AutoencoderConfig, TransformerConfig
from klein_agent.pipeline import KleinPipeline


def diffusers_transformer(config: TransformerConfig) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=config.in_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        timestep_guidance_channels=config.timestep_channels,
        mlp_ratio=config.mlp_ratio,
        axes_dims_rope=tuple(config.axes_dim),
        rope_theta=config.theta,
        eps=config.eps,
        guidance_embeds=False,
    ).eval()


def diffusers_autoencoder(config: AutoencoderConfig) -> AutoencoderKLFlux2:
    levels = len(config.block_out_channels)
    return AutoencoderKLFlux2(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        decoder_block_out_channels=config.decoder_block_out_channels,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_groups,
        batch_norm_eps=config.bn_eps,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_post_quant_conv,
        mid_block_add_attention=config.mid_attention,
    ).eval()


def diffusers_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler configuration shipped in the FLUX.2 klein repos' scheduler/scheduler_config.json."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def reference_pipeline(pipe: KleinPipeline) -> Any:
    """A `Flux2KleinPipeline` (`Flux2KleinKVPipeline` when `pipe` runs klein 9B-KV) holding `pipe`'s weights
    (through the key maps), built without a second host copy."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "guidance is ignored for distilled models", once per call
    with torch.device("meta"):
        transformer = diffusers_transformer(pipe.transformer.config)
        vae = diffusers_autoencoder(pipe.autoencoder.config)
        text = Qwen3ForCausalLM(pipe.text_embedder.full_config)
    transformer.load_state_dict(keymaps.transformer_to_diffusers(pipe.transformer.state_dict()), assign=True)
    vae.load_state_dict(keymaps.autoencoder_to_diffusers(pipe.autoencoder.state_dict()), assign=True)
    # The reference runs the encoder's full depth. Layers past 27 cannot change its output (it reads layer 27's
    # raw output); they get copies of layer 26 so they cost what real layers cost.
    ours = {k: v for k, v in pipe.text_embedder.model.state_dict().items() if not k.startswith("rotary_emb.")}
    kept = len(pipe.text_embedder.model.layers)
    state = {f"model.{k}": v for k, v in ours.items()}
    for layer in range(kept, pipe.text_embedder.full_config.num_hidden_layers):
        for k, v in ours.items():
            if k.startswith(f"layers.{kept - 1}."):
                state["model." + k.replace(f"layers.{kept - 1}.", f"layers.{layer}.", 1)] = v.clone()
    state.setdefault("model.norm.weight", torch.ones_like(ours["embed_tokens.weight"][0]))
    state["lm_head.weight"] = ours["embed_tokens.weight"]
    # With ours offloaded, its encoder waits in host memory; the reference keeps its own copy on the device, as
    # diffusers runs it (tools/bench.py subtracts memory only the reference holds from our peak).
    state = {k: v.to(pipe.device) for k, v in state.items()}
    text.load_state_dict(state, assign=True)
    text.model.rotary_emb = type(text.model.rotary_emb)(config=text.config).to(pipe.device)
    # klein 9B-KV weights go to diffusers' KV pipeline (reference pass at step 0, kept keys and values after)
    kind = Flux2KleinKVPipeline if getattr(pipe, "kv_references", False) else Flux2KleinPipeline
    reference = kind(
        scheduler=diffusers_scheduler(),
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=pipe.text_embedder.tokenizer,
        transformer=transformer.eval(),
        is_distilled=pipe.info.distilled,
    )
    reference.set_progress_bar_config(disable=True)
    return reference
