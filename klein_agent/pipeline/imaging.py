"""Pictures to tensors and back, and the reference-image preparation, exactly as diffusers' klein pipeline does them.

Mirrors `Flux2KleinPipeline.__call__` step 4 (with `Flux2ImageProcessor`) for references and
`VaeImageProcessor.postprocess` for outputs.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from klein_agent.rules.references import prepare_reference

__all__ = ["prepare_reference", "to_images", "to_tensor", "to_unit"]


def to_tensor(image: Image.Image) -> Tensor:
    """RGB picture -> [1, 3, H, W] float32 in [-1, 1] (x / 255 * 2 - 1, as the reference computes it).

    The layout is channels-last (a permuted [1, H, W, 3] buffer), as diffusers' `VaeImageProcessor` hands it to
    the encoder: convolution libraries pick their kernels by memory format, so the same layout gives the same
    sums (and oneDNN's channels-last kernels are the faster ones on CPU)."""
    rgb = image.convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    pixels = data.view(1, rgb.height, rgb.width, 3).float() / 255.0
    return (pixels * 2.0 - 1.0).permute(0, 3, 1, 2)


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
