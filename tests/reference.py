"""Builders for diffusers' reference components with the same sizes as ours (test-only; diffusers is a test extra)."""

from __future__ import annotations

from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

from klein_agent.configs import AutoencoderConfig, TransformerConfig


def diffusers_transformer(config: TransformerConfig) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=config.in_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        timestep_guidance_channels=256,
        mlp_ratio=config.mlp_ratio,
        axes_dims_rope=tuple(config.axes_dim),
        rope_theta=config.theta,
        eps=config.eps,
        guidance_embeds=False,
    ).eval()


def diffusers_autoencoder(config: AutoencoderConfig) -> AutoencoderKLFlux2:
    levels = len(config.ch_mult)
    return AutoencoderKLFlux2(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_groups,
        batch_norm_eps=config.bn_eps,
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
