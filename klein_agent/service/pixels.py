"""Any picture to RGB, by one rule: transparency on white, 16-bit scaled, palette/grey/CMYK converted.

Inputs are decoded with it, and previews and PNG files use it for anything that is not RGB already, so a picture
looks the same wherever it is shown or stored.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Rows converted at a time: about this many pixels, so a conversion's intermediates (an RGBA copy and a white
# canvas for transparency, int64 and float64 arrays for 16-bit grey: up to ~40 bytes a pixel) stay a few MB.
STRIP_PIXELS = 1 << 18


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode -> a new RGB picture: transparency (alpha, palette or tRNS colour key) composited on
    white, 16-bit grey scaled to 8 bits (v / 257, rounded) rather than clipped, palette/grey/CMYK converted.

    Converted in strips of rows into the one RGB result, so the memory it adds is the result (4 bytes a pixel:
    Pillow keeps RGB as RGBX) plus one strip's intermediates, whatever the mode; every pixel depends only on
    itself, so the strips give exactly the picture a whole conversion gives.

    The result carries none of the file's metadata (`info` is empty): Pillow's copy and convert keep ICC
    profiles, EXIF, XMP and PNG text (up to 64 MB of it from a few KB of zTXt), which would otherwise stay in
    memory with the picture and travel with every request that carries it (pickled to a Ray replica, where only
    pixels are counted: `replica.handle.fits_grpc`). The pixels are all that is used: EXIF orientation is applied
    before, and a stored import is a fresh PNG of the pixels."""
    out = _to_rgb(img)
    out.info = {}
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB" and "transparency" not in img.info:
        return img.copy()  # detach from the source file object
    rows = max(1, STRIP_PIXELS // max(1, img.width))
    if img.height <= rows:
        return _to_rgb_whole(img)
    out = Image.new("RGB", img.size)
    for top in range(0, img.height, rows):
        strip = img.crop((0, top, img.width, min(top + rows, img.height)))  # keeps palette and tRNS key
        out.paste(_to_rgb_whole(strip), (0, top))
    return out


def _to_rgb_whole(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img.convert("I"), dtype=np.int64)
        grey = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8), "L")
        key = img.info.get("transparency")
        if isinstance(key, int):
            opaque = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
            return Image.composite(grey, Image.new("L", grey.size, 255), opaque).convert("RGB")
        return grey.convert("RGB")
    if mode == "F":
        return img.point(lambda v: v * 255).convert("L").convert("RGB")
    # alpha channels, palette transparency and tRNS colour keys (greyscale or truecolour) alike become white
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()  # detach from the source file object and its metadata
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr
