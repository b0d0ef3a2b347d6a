"""Model sizes as frozen dataclasses, with presets for the published checkpoints and a tiny one for tests.

Presets are documentation and defaults for random-weight builds (benchmarks, tests). A real checkpoint's sizes are
always read from its own config.json files or tensor shapes (`klein_agent.checkpoints`), never from a preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")


@dataclass(frozen=True)
class AutoencoderConfig:
    """The FLUX.2 autoencoder (BFL `AutoEncoderParams`): 8x spatial compression, 2x2 patchified latents."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    bn_eps: float = 1e-4

    @property
    def latent_channels(self) -> int:
        return 4 * self.z_channels  # after the 2x2 patchify

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


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


def text_output_layers(num_hidden_layers: int) -> tuple[int, int, int]:
    """Which decoder layers' outputs condition the transformer: the quarter points of the encoder's depth.

    For the 36-layer Qwen3-4B and Qwen3-8B this is (9, 18, 27), the layers BFL and diffusers take; deriving it from
    the depth lets tiny test encoders use the same rule.
    """
    n = num_hidden_layers
    if n < 4:
        raise ValueError(f"the text encoder needs at least 4 layers, got {n}")
    return (n // 4, n // 2, 3 * n // 4)


@dataclass(frozen=True)
class SamplingDefaults:
    distilled: bool = True
    steps: int = 4
    guidance: float = 1.0  # distilled models take no guidance; Base models use true CFG against ""


@dataclass(frozen=True)
class ModelPreset:
    name: str
    transformer: TransformerConfig
    autoencoder: AutoencoderConfig
    text_encoder: TextEncoderConfig
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    licence: str = "Apache-2.0"


_KLEIN_4B = TransformerConfig()
_KLEIN_9B = TransformerConfig(
    context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24
)
_QWEN3_4B = TextEncoderConfig()
_QWEN3_8B = TextEncoderConfig(hidden_size=4096, intermediate_size=12288)
_BASE = SamplingDefaults(distilled=False, steps=50, guidance=4.0)
_NON_COMMERCIAL = "FLUX Non-Commercial License"

# The tiny preset keeps every structural feature (several blocks of each kind, 4 RoPE axes, 2 heads, GroupNorm
# groups, 3 autoencoder levels) at a size that runs a whole pipeline on a CPU in well under a second.
_TINY_TEXT = TextEncoderConfig(
    vocab_size=272,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
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
    autoencoder=AutoencoderConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=8),
    text_encoder=_TINY_TEXT,
)

PRESETS: dict[str, ModelPreset] = {
    "klein-4b": ModelPreset("klein-4b", _KLEIN_4B, AutoencoderConfig(), _QWEN3_4B),
    "klein-base-4b": ModelPreset("klein-base-4b", _KLEIN_4B, AutoencoderConfig(), _QWEN3_4B, _BASE),
    "klein-9b": ModelPreset("klein-9b", _KLEIN_9B, AutoencoderConfig(), _QWEN3_8B, licence=_NON_COMMERCIAL),
    "klein-base-9b": ModelPreset(
        "klein-base-9b", _KLEIN_9B, AutoencoderConfig(), _QWEN3_8B, _BASE, licence=_NON_COMMERCIAL
    ),
    "tiny": _TINY,
}


def preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
