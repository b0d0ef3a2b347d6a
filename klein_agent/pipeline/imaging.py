"""Pictures to tensors and back, and the reference-image preparation, exactly as diffusers' klein pipeline does them.

Mirrors `Flux2KleinPipeline.__call__` step 4 (with `Flux2ImageProcessor`) for references and
`VaeImageProcessor.postprocess` for outputs.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from klein_agent.rules.references import prepare_reference

__all__ = ["ENCODER_LAYOUT", "prepare_reference", "to_images", "to_tensor", "to_unit"]

# The memory format the autoencoder's encoder is fed, chosen on purpose. Convolution libraries (oneDNN on the CPU,
# cuDNN on CUDA) pick their kernels by the input's memory format and keep it through the network, so this one
# choice decides the layout of every encoder convolution:
# - parity: diffusers' `VaeImageProcessor` hands the encoder exactly this layout (its NumPy [1, H, W, 3] pixels,
#   transposed), so the same kernels run and give the same sums;
# - speed: channels-last is oneDNN's fast path on the CPU and cuDNN's native layout for bfloat16 tensor cores; an
#   NCHW input makes conv_in and everything after it run the NCHW kernels (tools/bench_layout.py measures both;
#   docs/benchmarks.md has the figures).
# The decoder is left in the layout the reference decodes in (NCHW, from the unpacked latents).
ENCODER_LAYOUT = torch.channels_last


def to_tensor(image: Image.Image) -> Tensor:
    """RGB picture -> [1, 3, H, W] float32 in [-1, 1] (x / 255 * 2 - 1, as the reference computes it), laid out
    in `ENCODER_LAYOUT` (channels-last: strides [3HW, 1, 3W, 3], a permuted [1, H, W, 3] buffer, no copy).

    Move it with `.to(device, dtype, memory_format=ENCODER_LAYOUT)` so a device or dtype change keeps the layout."""
    rgb = image.convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    pixels = data.view(1, rgb.height, rgb.width, 3).float() / 255.0  # [1, H, W, 3]
    return (pixels * 2.0 - 1.0).permute(0, 3, 1, 2)  # [1, 3, H, W], channels-last strides


def to_unit(x: Tensor) -> Tensor:
    """Decoder output [B, 3, H, W] in [-1, 1] -> [0, 1], computed in the decoder's dtype as the reference does
    (so a bfloat16 decode is quantised the same way), returned as float32."""
    return (x * 0.5 + 0.5).clamp(0, 1).float()


def to_images(unit: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] float32 in [0, 1] -> RGB pictures, rounding half to even to 8 bits."""
    pixels = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [
        Image.frombytes("RGB", (p.shape[1], p.shape[0]), p.contiguous().numpy().tobytes()) for p in pixels
    ]
