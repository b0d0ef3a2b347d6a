"""Stored images small enough for one message: the PNG as stored when it fits, else the same pixels as lossless
WebP when that fits, else nothing (the caller says to export the file instead).

Lossless WebP (Pillow, `exact=True`) keeps every pixel value, transparent ones included; greyscale comes back as
RGB with equal channels. It is tried only when it could plausibly fit: it seldom saves more than a third of a PNG,
and encoding a 2048x2048 picture takes seconds on a CPU (measured 6-8 s on one shared core at method 4).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

# WebP lossless is tried for PNGs up to this many times the budget: photographs save 10-30 % (2048x2048 measured:
# 5.1 -> 3.7 MB, 7.9 -> 7.1 MB); noise saves nothing.
WEBP_WORTH_TRYING = 1.5
WEBP_METHOD = 4  # Pillow's default effort; 6 is slower for a few percent more


@dataclass(frozen=True)
class Fitted:
    """What to send: `data` in `mime_type`, or `data` None when neither encoding fits (sizes in bytes)."""

    data: bytes | None
    mime_type: str
    png_bytes: int
    webp_bytes: int | None  # None when WebP was not tried


def fit_png(png: bytes, max_bytes: int) -> Fitted:
    """`png` itself when it has at most `max_bytes`, else its pixels as lossless WebP when that has at most
    `max_bytes`, else `Fitted(data=None)`. Raises PIL errors only for a file that is not a readable PNG."""
    if len(png) <= max_bytes:
        return Fitted(png, "image/png", len(png), None)
    if len(png) > max_bytes * WEBP_WORTH_TRYING:
        return Fitted(None, "image/png", len(png), None)
    with Image.open(io.BytesIO(png)) as opened:
        opened.load()
        image = (
            opened
            if opened.mode in ("RGB", "RGBA")
            else opened.convert("RGBA" if "A" in opened.mode else "RGB")
        )
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", lossless=True, quality=100, method=WEBP_METHOD, exact=True)
    webp = buffer.getvalue()
    if len(webp) <= max_bytes:
        return Fitted(webp, "image/webp", len(png), len(webp))
    return Fitted(None, "image/png", len(png), len(webp))
