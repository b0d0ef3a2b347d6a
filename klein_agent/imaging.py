"""Pictures to tensors and back, and the reference-image preparation the reference pipeline applies."""

from __future__ import annotations

import math

import torch
from PIL import Image
from torch import Tensor

from klein_agent.request import MULTIPLE

REFERENCE_MAX_AREA = 1024 * 1024  # every reference is scaled down to at most ~1 Mpx, as diffusers' klein does
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8.0


def prepare_reference(image: Image.Image, max_area: int = REFERENCE_MAX_AREA) -> Image.Image:
    """Scale down (Lanczos) to at most `max_area` pixels, then center-crop to multiples of 16."""
    image = image.convert("RGB")
    w, h = image.size
    if min(w, h) < REFERENCE_MIN_SIDE:
        raise ValueError(f"reference image is {w}x{h}; both sides must be at least {REFERENCE_MIN_SIDE} px")
    if max(w / h, h / w) > REFERENCE_MAX_ASPECT:
        raise ValueError(
            f"reference image is {w}x{h}; the aspect ratio must be at most {REFERENCE_MAX_ASPECT:g}:1"
        )
    if w * h > max_area:
        scale = math.sqrt(max_area / (w * h))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
        w, h = image.size
    cw, ch = (w // MULTIPLE) * MULTIPLE, (h // MULTIPLE) * MULTIPLE
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def to_tensor(image: Image.Image) -> Tensor:
    """RGB picture -> [1, 3, H, W] float32 in [-1, 1]."""
    rgb = image.convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    pixels = data.view(rgb.height, rgb.width, 3).permute(2, 0, 1)[None].float() / 255.0
    return pixels * 2.0 - 1.0


def to_images(x: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB pictures, rounding to the nearest 8-bit value."""
    pixels = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [
        Image.frombytes("RGB", (p.shape[1], p.shape[0]), p.contiguous().numpy().tobytes()) for p in pixels
    ]


def check_output_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < MULTIPLE or value % MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {MULTIPLE}, got {value}")
