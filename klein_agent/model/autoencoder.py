"""The FLUX.2 autoencoder: an 8x convolutional VAE whose latents are 2x2-patchified and batch-normalised.

Module names follow BFL's `flux2/autoencoder.py` (`encoder.down.{i}.block.{j}`, `decoder.up.{i}`, ...);
`klein_agent.loading.keymaps` maps the diffusers `vae/` layout onto them. Encoding takes the posterior mean (no sampling).

Shapes: images [B, 3, H, W] in [-1, 1]; raw latents [B, z, H/f, W/f] with f = 2 ** (levels - 1) (8 for klein);
model latents [B, 4z, H/2f, W/2f].
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klein_agent.model.configs import AutoencoderConfig


class AutoEncoder(nn.Module):
    """The FLUX.2 VAE with its latent batch-norm statistics; mirrors BFL `flux2/autoencoder.py` `AutoEncoder`.

    Runs in the weights' dtype; the batch-norm statistics are loaded in that dtype too (see
    `klein_agent.loading.checkpoints.load_strict`).
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Only the running statistics are used (eval mode): a fixed per-channel normalisation of patchified latents.
        self.bn = nn.BatchNorm2d(
            config.latent_channels, eps=config.bn_eps, affine=False, track_running_stats=True
        )

    def encode(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, 4z, H/16, W/16]
        """Images [B, 3, H, W] in [-1, 1] -> normalised model latents [B, 4z, H/16, W/16], in the input dtype.

        Takes the posterior mean, as diffusers `Flux2KleinPipeline._encode_vae_image` (`sample_mode="argmax"`)
        and BFL `AutoEncoder.encode` do; H and W must be multiples of 2f px (16 for klein).
        """
        mean = self.encoder(x).chunk(2, dim=1)[0]  # [B, z, H/8, W/8]
        return self.normalize(patchify(mean))

    def decode(self, z: Tensor) -> Tensor:  # [B, 4z, H/16, W/16] -> [B, 3, H, W]
        """Normalised model latents [B, 4z, h, w] -> images [B, 3, 16h, 16w], about [-1, 1] (not clamped)."""
        return self.decoder(unpatchify(self.denormalize(z)))

    def normalize(self, z: Tensor) -> Tensor:
        """Patchified latents [B, 4z, h, w] -> zero mean, unit variance per channel, in `z`'s dtype."""
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        """The inverse of `normalize` (BFL `AutoEncoder.inv_normalize`), computed in `z`'s dtype."""
        mean, std = self._bn_stats(z)
        return z * std + mean

    def _bn_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        assert self.bn.running_mean is not None and self.bn.running_var is not None
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(z.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.bn_eps).to(z.dtype)
        return mean, std


class Encoder(nn.Module):
    """Images to latent moments (mean and log-variance); mirrors BFL `flux2/autoencoder.py` `Encoder`."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        block_in = channels[0]
        for level, block_out in enumerate(channels):
            last = level == len(channels) - 1
            self.down.append(
                EncoderLevel(block_in, block_out, config.num_res_blocks, config.norm_groups, not last)
            )
            block_in = block_out
        self.mid = MidBlock(block_in, config.norm_groups, config.mid_attention)
        self.norm_out = group_norm(block_in, config.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)
        z2 = 2 * config.z_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if config.use_quant_conv else None

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, 2z, H/f, W/f] (mean, logvar)
        """[B, 3, H, W] in [-1, 1] -> [B, 2z, H/f, W/f]: the mean channels first, then the log-variance."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h if self.quant_conv is None else self.quant_conv(h)


class Decoder(nn.Module):
    """Raw latents to images; mirrors BFL `flux2/autoencoder.py` `Decoder`.

    Its channels are `config.decoder_channels`, which may be smaller than the encoder's (diffusers
    `decoder_block_out_channels`).
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        channels = config.decoder_channels
        block_in = channels[-1]
        z = config.z_channels
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.use_post_quant_conv else None
        self.conv_in = nn.Conv2d(z, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, config.norm_groups, config.mid_attention)
        # BFL indexes `up` from the highest resolution (0) to the lowest, and runs it in reverse
        up: list[nn.Module] = []
        for level in reversed(range(len(channels))):
            block_out = channels[level]
            up.insert(
                0,
                DecoderLevel(block_in, block_out, config.num_res_blocks + 1, config.norm_groups, level != 0),
            )
            block_in = block_out
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in, config.norm_groups)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # [B, z, H/f, W/f] -> [B, 3, H, W]
        """Raw (unpatchified, denormalised) latents [B, z, H/f, W/f] -> images [B, 3, H, W]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class EncoderLevel(nn.Module):
    """One encoder resolution: `blocks` ResnetBlocks, then a 2x downsample unless it is the last level.

    BFL's `Encoder.down[i]` (a bare `nn.Module` with `block` and `downsample`), named so the keys match.
    """

    def __init__(
        self, in_channels: int, out_channels: int, blocks: int, groups: int, downsample: bool
    ) -> None:
        super().__init__()
        channels = [in_channels] + [out_channels] * blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in itertools.pairwise(channels))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H/2, W/2], or [B, C_out, H, W] without a downsample."""
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """One decoder resolution: `blocks` ResnetBlocks, then a 2x upsample unless it is the highest resolution.

    BFL's `Decoder.up[i]` (a bare `nn.Module` with `block` and `upsample`), named so the keys match.
    """

    def __init__(self, in_channels: int, out_channels: int, blocks: int, groups: int, upsample: bool) -> None:
        super().__init__()
        channels = [in_channels] + [out_channels] * blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in itertools.pairwise(channels))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, 2H, 2W], or [B, C_out, H, W] without an upsample."""
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class MidBlock(nn.Module):
    """ResnetBlock, optional self-attention, ResnetBlock at the lowest resolution; BFL's `Encoder.mid` and
    `Decoder.mid` (`block_1`, `attn_1`, `block_2`), diffusers `UNetMidBlock2D`."""

    def __init__(self, channels: int, groups: int, attention: bool = True) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        h = self.block_1(x)
        if self.attn_1 is not None:
            h = self.attn_1(h)
        return self.block_2(h)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 convolution, twice, plus a skip (a 1x1 convolution when the channel count
    changes); mirrors BFL `flux2/autoencoder.py` `ResnetBlock`."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions.

    The projections are stored as BFL stores them (1x1 convolutions) and applied as diffusers applies them (linear
    layers over [B, HW, C] tokens): the same arithmetic, and in bfloat16 the same rounding as the reference.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W], with the attention output added to the input."""
        b, c, h, w = x.shape
        # normalised as [B, C, HW] and projected as [B, HW, C] tokens, the views diffusers' AttnProcessor2_0 uses
        channels = x.reshape(b, c, h * w)
        tokens = self.norm(channels).transpose(1, 2)  # [B, HW, C]
        # [B, 1, HW, C], unit stride in C: SDPA's fused kernels need a unit-stride last dimension; without one they
        # fall back to materialising the HW x HW attention matrix (1 GB for a 1024 px decode)
        q, k, v = (_linear(tokens, proj)[:, None] for proj in (self.q, self.k, self.v))
        out = _linear(F.scaled_dot_product_attention(q, k, v)[:, 0], self.proj_out)  # [B, HW, C]
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def _linear(tokens: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 convolution applied to [B, N, C] tokens as the linear layer it is."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel right and bottom; mirrors BFL `Downsample`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H/2, W/2] (H and W even)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as trained


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution; mirrors BFL `Upsample`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """The autoencoder's GroupNorm: affine, eps 1e-6, as BFL and diffusers build it."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def patchify(z: Tensor) -> Tensor:
    """[B, C, 2h, 2w] -> [B, 4C, h, w]; channel index c*4 + pi*2 + pj."""
    b, c, h2, w2 = z.shape
    z = z.view(b, c, h2 // 2, 2, w2 // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, 4 * c, h2 // 2, w2 // 2)


def unpatchify(z: Tensor) -> Tensor:
    """[B, 4C, h, w] -> [B, C, 2h, 2w]; the inverse of `patchify`."""
    b, c4, h, w = z.shape
    z = z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c4 // 4, 2 * h, 2 * w)
