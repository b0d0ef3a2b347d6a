"""Model sizes as frozen dataclasses, with presets for the published checkpoints and a tiny one for tests.

Presets are documentation and defaults for random-weight builds (benchmarks, tests). A real checkpoint's sizes are
always read from its own config.json files or tensor shapes (`klein_agent.loading.checkpoints`), never from a preset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from klein_agent.rules import limits


@dataclass(frozen=True)
class TransformerConfig:
    """The FLUX.2 flow transformer (BFL `Flux2Params`)."""

    in_channels: int = 128  # 32 autoencoder channels x 2x2 patch
    context_in_dim: int = 7680  # 3 text-encoder layers concatenated per token
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5  # double-stream blocks
    depth_single_blocks: int = 20
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE dims per (t, h, w, l) axis; sums to the head dim
    theta: int = 2000
    eps: float = 1e-6
    timestep_channels: int = (
        256  # sinusoidal timestep features fed to time_in (diffusers timestep_guidance_channels)
    )

    @property
    def head_dim(self) -> int:
        """Channels per attention head (128 for klein)."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Width of the MLP's hidden layer after the SwiGLU gate (its input projection is twice this)."""
        return int(self.hidden_size * self.mlp_ratio)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")


@dataclass(frozen=True)
class Flux3TransformerConfig:
    """The FLUX 3 [klein] transformer (diffusers `Flux3Transformer2DModel`): per-mode blocks for the image, the
    references and the text, then joint blocks over all three; per-mode modulation; a flow map (the distilled model)
    also embeds the timestep each step jumps to."""

    in_channels: int = 128  # image tokens: 32 autoencoder channels x 2x2 patch
    cond_in_channels: int = 128  # reference tokens (their own input projection)
    context_in_dim: int = 20480  # 8 Qwen3-VL layers stacked per token, 8 x 2560
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5  # mode blocks for each of image, references and text
    depth_single_blocks: int = 28  # joint blocks
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE dims per (t, h, w, l) axis; sums to the head dim
    theta: int = 10000
    eps: float = 1e-6
    timestep_channels: int = 256
    flow_map: bool = False  # the step-distilled model: adds the target-timestep embedder

    @property
    def head_dim(self) -> int:
        """Channels per attention head (128 for FLUX 3 klein)."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Width of the MLP's hidden layer after the SwiGLU gate (its input projection is twice this)."""
        return int(self.hidden_size * self.mlp_ratio)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")


@dataclass(frozen=True)
class AutoencoderConfig:
    """The FLUX.2 autoencoder (BFL `AutoEncoderParams`, diffusers `AutoencoderKLFlux2`): one level per entry of
    `block_out_channels`, each but the last halving the resolution; 2x2-patchified, batch-normalised latents.

    The optional parts mirror the diffusers config switches, so any checkpoint diffusers writes loads as it is:
    `use_quant_conv` / `use_post_quant_conv` (1x1 convolutions around the latent), `mid_attention`
    (diffusers `mid_block_add_attention`) and a separate, smaller decoder (`decoder_block_out_channels`).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: the encoder's
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    bn_eps: float = 1e-4
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The decoder's channels per level: `decoder_block_out_channels`, else the encoder's."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def latent_channels(self) -> int:
        """Channels of a model latent (128 for klein), the width of the latent batch norm."""
        return 4 * self.z_channels  # after the 2x2 patchify

    @property
    def downsample_factor(self) -> int:
        """How many pixels one raw latent spans per side (8 for klein): one halving per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def pixels_per_token(self) -> int:
        """Side in pixels of one latent token: the autoencoder's factor times the 2x2 patch (16 for klein).

        Output sizes and prepared references are multiples of it (diffusers: `vae_scale_factor * 2`)."""
        return 2 * self.downsample_factor

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        if len(self.decoder_channels) != len(self.block_out_channels):
            raise ValueError("the decoder must have as many levels as the encoder")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Qwen3 sizes, used only to build random encoders; real ones come from the checkpoint's config.json."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6


# The Qwen3 decoder layers whose outputs condition the transformer, whatever the encoder's depth: BFL
# `text_encoder.py` OUTPUT_LAYERS_QWEN3 and diffusers `Flux2KleinPipeline(text_encoder_out_layers=(9, 18, 27))`.
TEXT_OUTPUT_LAYERS: tuple[int, ...] = (9, 18, 27)


# FLUX 3 reads eight hidden states of its Qwen3-VL text tower, stacked per token (diffusers
# `Flux3TextEncoderStep(text_encoder_out_layers=(4, 8, ..., 32))`). They index `hidden_states`, whose entry 0 is the
# embedding output: entry k is decoder layer k's output, raw unless k is the encoder's last layer.
FLUX3_TEXT_OUTPUT_LAYERS: tuple[int, ...] = (4, 8, 12, 16, 20, 24, 28, 32)


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of diffusers' `FlowMatchEulerDiscreteScheduler` config that change a klein schedule.

    Defaults are the klein repos' `scheduler/scheduler_config.json`. klein always passes `mu`, so
    base_shift/max_shift/base_image_seq_len/max_image_seq_len never matter; `shift` matters only without dynamic
    shifting. Switches that change the sampler itself (karras/exponential/beta sigmas, inverted sigmas, stochastic
    sampling) are refused when a checkpoint is loaded.
    """

    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"  # or "linear"
    shift: float = 3.0
    shift_terminal: float | None = None


@dataclass(frozen=True)
class SamplingDefaults:
    """A model's default step count and guidance scale, and whether it is step-distilled. The values live in
    `rules.limits` (the help texts and tool descriptions read them there too)."""

    distilled: bool = True
    steps: int = limits.DISTILLED_STEPS
    guidance: float = (
        limits.DISTILLED_GUIDANCE
    )  # distilled models take none; Base models use true CFG against ""


# The two kinds of klein: step-distilled (klein, klein 9B-KV) and Base. Presets and real checkpoints use these.
DISTILLED_SAMPLING = SamplingDefaults()
BASE_SAMPLING = SamplingDefaults(distilled=False, steps=limits.BASE_STEPS, guidance=limits.BASE_GUIDANCE)
FLUX3_DISTILLED_SAMPLING = SamplingDefaults(steps=limits.FLUX3_DISTILLED_STEPS)
FLUX3_BASE_SAMPLING = SamplingDefaults(
    distilled=False, steps=limits.FLUX3_BASE_STEPS, guidance=limits.FLUX3_BASE_GUIDANCE
)
# FLUX 3's schedule: a constant shift, no dynamic shifting (diffusers `Flux3SetTimestepsStep`)
FLUX3_SCHEDULER = SchedulerConfig(use_dynamic_shifting=False, shift=limits.FLUX3_SHIFT)


@dataclass(frozen=True)
class ModelPreset:
    """One model's sizes (transformer, autoencoder, text encoder), sampling defaults and licence."""

    name: str
    transformer: TransformerConfig | Flux3TransformerConfig  # which one says the family (FLUX.2 or FLUX 3)
    autoencoder: AutoencoderConfig
    text_encoder: TextEncoderConfig
    sampling: SamplingDefaults = DISTILLED_SAMPLING
    licence: str = "Apache-2.0"
    # klein 9B-KV: references run once at timestep 0, attending only to themselves; their keys and values are kept
    kv_references: bool = False
    repo: str | None = (
        None  # the Hugging Face repo of the official checkpoint (None: a benchmark or test shape)
    )


_KLEIN_4B = TransformerConfig()
_KLEIN_9B = TransformerConfig(
    context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24
)
_QWEN3_4B = TextEncoderConfig()
_QWEN3_8B = TextEncoderConfig(hidden_size=4096, intermediate_size=12288)
_NON_COMMERCIAL = "FLUX Non-Commercial License"

# The tiny preset keeps every structural feature (several blocks of each kind, 4 RoPE axes, 2 heads, GroupNorm
# groups, 3 autoencoder levels) at a size that runs a whole pipeline on a CPU in well under a second.
_TINY_TEXT = TextEncoderConfig(
    vocab_size=272,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=28,  # the fewest layers that still have a raw (pre-norm) output at layer 27
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
)
_TINY = ModelPreset(
    name="tiny",
    transformer=TransformerConfig(
        in_channels=16,
        context_in_dim=3 * _TINY_TEXT.hidden_size,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(8, 8, 8, 8),
    ),
    autoencoder=AutoencoderConfig(
        block_out_channels=(16, 32, 32, 32), num_res_blocks=1, z_channels=4, norm_groups=8
    ),
    text_encoder=_TINY_TEXT,
)

# A benchmark shape between tiny and 4B: real channel counts in the autoencoder's outer levels, a transformer a
# few hundred times smaller than the 4B, a text encoder deep enough for layers 9/18/27. Runs in seconds on a CPU.
_MID_TEXT = TextEncoderConfig(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=28,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
)
_MID = ModelPreset(
    name="mid",
    transformer=TransformerConfig(
        in_channels=128,
        context_in_dim=3 * _MID_TEXT.hidden_size,
        hidden_size=768,
        num_heads=12,
        depth=2,
        depth_single_blocks=6,
        axes_dim=(16, 16, 16, 16),
    ),
    autoencoder=AutoencoderConfig(block_out_channels=(64, 128, 256, 256), num_res_blocks=1),
    text_encoder=_MID_TEXT,
)

# FLUX 3 [klein]: sizes from diffusers' `Flux3Transformer2DModel` defaults (the distilled and Base transformers
# differ only in the flow map's target-timestep embedder). The text tower is Qwen3-VL-4B's: 36 layers of 2560
# (2560 follows from 20480 / 8; the depth, widths and rope theta are Qwen3-VL-4B-Instruct's published config).
_FLUX3_KLEIN = Flux3TransformerConfig()
_QWEN3_VL_4B = TextEncoderConfig(max_position_embeddings=262144, rope_theta=5_000_000.0)
# BFL's table for both transformers (docs/flux3-klein-reference.md §1); the checkpoint's LICENSE file is the authority:
# `klein-agent models` and the start-up log print its first line when the folder has one
_FLUX3_LICENCE = "FLUX Kommunity License"

# The tiny FLUX 3 keeps every structural feature: two blocks of each kind, 4 RoPE axes, 2 heads, a text tower deep
# enough for layer 32 to be a raw (pre-norm) output, 4 autoencoder levels (diffusers' Flux3ImageProcessor
# hard-codes 16 px per token).
_FLUX3_TINY_TEXT = replace(_TINY_TEXT, num_hidden_layers=36)
_FLUX3_TINY_TRANSFORMER = Flux3TransformerConfig(
    in_channels=16,
    cond_in_channels=16,
    context_in_dim=len(FLUX3_TEXT_OUTPUT_LAYERS) * _FLUX3_TINY_TEXT.hidden_size,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 8, 8, 8),
    flow_map=True,
)

# FLUX 3's benchmark shape for CPU runs, beside `mid`: the real head width (128) and RoPE axes, 2 mode blocks per
# mode and 6 joint blocks of 768, `mid`'s autoencoder, and a 36-layer text tower (layer 32 is a raw output) of 512.
_FLUX3_MID_TEXT = replace(_MID_TEXT, num_hidden_layers=36)
_FLUX3_MID_TRANSFORMER = Flux3TransformerConfig(
    context_in_dim=len(FLUX3_TEXT_OUTPUT_LAYERS) * _FLUX3_MID_TEXT.hidden_size,
    hidden_size=768,
    num_heads=6,
    depth=2,
    depth_single_blocks=6,
    flow_map=True,
)
_FLUX3_MID = ModelPreset(
    "flux3-mid",
    _FLUX3_MID_TRANSFORMER,
    _MID.autoencoder,
    _FLUX3_MID_TEXT,
    FLUX3_DISTILLED_SAMPLING,
)

PRESETS: dict[str, ModelPreset] = {
    "klein-4b": ModelPreset(
        "klein-4b", _KLEIN_4B, AutoencoderConfig(), _QWEN3_4B, repo="black-forest-labs/FLUX.2-klein-4B"
    ),
    "klein-base-4b": ModelPreset(
        "klein-base-4b",
        _KLEIN_4B,
        AutoencoderConfig(),
        _QWEN3_4B,
        BASE_SAMPLING,
        repo="black-forest-labs/FLUX.2-klein-base-4B",
    ),
    "klein-9b": ModelPreset(
        "klein-9b",
        _KLEIN_9B,
        AutoencoderConfig(),
        _QWEN3_8B,
        licence=_NON_COMMERCIAL,
        repo="black-forest-labs/FLUX.2-klein-9B",
    ),
    "klein-9b-kv": ModelPreset(
        "klein-9b-kv",
        _KLEIN_9B,
        AutoencoderConfig(),
        _QWEN3_8B,
        licence=_NON_COMMERCIAL,
        kv_references=True,
        repo="black-forest-labs/FLUX.2-klein-9b-kv",
    ),
    "klein-base-9b": ModelPreset(
        "klein-base-9b",
        _KLEIN_9B,
        AutoencoderConfig(),
        _QWEN3_8B,
        BASE_SAMPLING,
        licence=_NON_COMMERCIAL,
        repo="black-forest-labs/FLUX.2-klein-base-9B",
    ),
    "flux3-klein": ModelPreset(
        "flux3-klein",
        replace(_FLUX3_KLEIN, flow_map=True),
        AutoencoderConfig(),
        _QWEN3_VL_4B,
        FLUX3_DISTILLED_SAMPLING,
        licence=_FLUX3_LICENCE,
        repo="black-forest-labs/flux-3-image-klein",
    ),
    "flux3-klein-base": ModelPreset(
        "flux3-klein-base",
        _FLUX3_KLEIN,
        AutoencoderConfig(),
        _QWEN3_VL_4B,
        FLUX3_BASE_SAMPLING,
        licence=_FLUX3_LICENCE,
        repo="black-forest-labs/flux-3-image-klein-base",
    ),
    "mid": _MID,
    "tiny": _TINY,
    "flux3-mid": _FLUX3_MID,
    "flux3-mid-base": replace(
        _FLUX3_MID,
        name="flux3-mid-base",
        transformer=replace(_FLUX3_MID_TRANSFORMER, flow_map=False),
        sampling=FLUX3_BASE_SAMPLING,
    ),
    "flux3-tiny": ModelPreset(
        "flux3-tiny", _FLUX3_TINY_TRANSFORMER, _TINY.autoencoder, _FLUX3_TINY_TEXT, FLUX3_DISTILLED_SAMPLING
    ),
    "flux3-tiny-base": ModelPreset(
        "flux3-tiny-base",
        replace(_FLUX3_TINY_TRANSFORMER, flow_map=False),
        _TINY.autoencoder,
        _FLUX3_TINY_TEXT,
        FLUX3_BASE_SAMPLING,
    ),
}


def preset(name: str) -> ModelPreset:
    """The preset called `name`; raises ValueError naming the known presets when there is none."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
