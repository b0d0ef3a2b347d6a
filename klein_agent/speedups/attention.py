"""Which scaled-dot-product-attention kernel runs, chosen on purpose, in one place.

PyTorch's own choice among its SDPA kernels is a fixed order (flash, efficient, math; cuDNN later or not at all
depending on the version) filtered by what each accepts. On Hopper, cuDNN's fused attention is the fastest for the
transformer's shapes (head dim 128, thousands of tokens, bf16), ahead of flash-attention 2; so the order is given
explicitly with `torch.nn.attention.sdpa_kernel(order, set_priority=True)`: the first kernel that accepts the call
runs, and the rest are fallbacks, never an error.

- The transformer (head dim 128): cuDNN (CUDA, compute capability 9.0+, where cuDNN's SDPA is built), flash
  (8.0+), memory-efficient, math. FA3 (the `flash_attn_interface` package, Hopper only) is reported as available
  but is not called: SDPA has no slot for it, and wiring a third-party kernel into the blocks is left until it can
  be measured on a GPU.
- The autoencoder's attention (one head of 512 channels at the lowest resolution): flash and cuDNN take head dims
  up to 256 only, so on CUDA it is memory-efficient (any multiple of 8), then math. On the CPU both models use
  PyTorch's fused CPU flash kernel (any head dim), then math.

`attention_order` is the pure rule (platform facts in, kernel list out), tested on the CPU for every platform;
`AttentionPlan.for_device` reads the facts of a real device.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Head dims each fused CUDA kernel accepts (PyTorch's sdp_utils checks): flash and cuDNN up to 256; the
# memory-efficient kernel any multiple of 8 (bf16/fp16) — the autoencoder's 512 included.
FLASH_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Platform:
    """What decides the order: the device type, its CUDA compute capability, and which kernels this build has."""

    device_type: str
    capability: tuple[int, int] | None = None  # CUDA only
    cudnn_attention: bool = False  # torch built with cuDNN SDPA (and cuDNN present)
    flash_attention: bool = False  # torch built with flash-attention for CUDA
    fa3: bool = False  # the flash_attn_interface package (FA3, Hopper) importable

    @classmethod
    def of(cls, device: torch.device) -> Platform:
        """The facts of `device` on this machine."""
        if device.type != "cuda":
            return cls(device.type)
        capability = torch.cuda.get_device_capability(device)
        return cls(
            "cuda",
            capability,
            cudnn_attention=torch.backends.cudnn.is_available() and torch.version.hip is None,
            flash_attention=torch.backends.cuda.is_flash_attention_available(),
            fa3=capability == (9, 0) and importlib.util.find_spec("flash_attn_interface") is not None,
        )


def attention_order(platform: Platform, head_dim: int) -> list[SDPBackend]:
    """The SDPA kernels to try, best first, for attention with `head_dim` on `platform` (see the module docstring).
    Always ends with MATH, which takes everything."""
    if platform.device_type != "cuda":
        # the CPU's fused kernel is SDPBackend.FLASH_ATTENTION there; MPS and others take what they have
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    major = platform.capability[0] if platform.capability else 0
    order = []
    if platform.cudnn_attention and major >= 9 and head_dim <= CUDNN_MAX_HEAD_DIM:
        order.append(SDPBackend.CUDNN_ATTENTION)
    if platform.flash_attention and major >= 8 and head_dim <= FLASH_MAX_HEAD_DIM:
        order.append(SDPBackend.FLASH_ATTENTION)
    if head_dim % 8 == 0:
        order.append(SDPBackend.EFFICIENT_ATTENTION)
    order.append(SDPBackend.MATH)
    return order


@dataclass(frozen=True)
class AttentionPlan:
    """The kernel order of each model on one device; `transformer()` and `autoencoder()` are context managers that
    set it around their calls (a thread-local setting, so the server's one model thread owns it)."""

    transformer_order: tuple[SDPBackend, ...]
    autoencoder_order: tuple[SDPBackend, ...]
    fa3_available: bool = False

    @classmethod
    def for_device(
        cls, device: torch.device, transformer_head_dim: int, autoencoder_head_dim: int
    ) -> AttentionPlan:
        """The plan for `device` (see `attention_order`)."""
        platform = Platform.of(device)
        return cls(
            tuple(attention_order(platform, transformer_head_dim)),
            tuple(attention_order(platform, autoencoder_head_dim)),
            platform.fa3,
        )

    @contextlib.contextmanager
    def transformer(self) -> Iterator[None]:
        """Run the transformer's attention with its order."""
        with sdpa_kernel(list(self.transformer_order), set_priority=True):
            yield

    @contextlib.contextmanager
    def autoencoder(self) -> Iterator[None]:
        """Run the autoencoder's attention with its order."""
        with sdpa_kernel(list(self.autoencoder_order), set_priority=True):
            yield
