"""The PNG format of every picture klein-agent writes: the store's files, exports and CLI outputs.

Pixels only, from a fresh buffer, so nothing of an input file (EXIF, GPS, ICC profile, text chunks) rides along;
the one piece of metadata is a `klein-agent` tEXt chunk of compact JSON provenance (the recipe). The same pixels
and provenance give the same bytes: keys are sorted and Pillow writes no timestamp.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

from klein_agent.service.pixels import to_rgb

PROVENANCE_KEY = "klein-agent"

# zlib level 1, measured on a natural-looking 1024x1024 picture (sensor-like noise over smooth content), CPU:
# level 1 151 ms / 1.91 MB, level 4 288 ms / 1.66 MB, level 6 (Pillow's default) 323 ms / 1.66 MB, level 0
# 79 ms / 3.15 MB. Half the encode time for 15% more bytes: an agent waits on every encode, the disk quota is
# in gigabytes. Noise (the tiny test model's pictures) is incompressible at any level.
COMPRESS_LEVEL = 1


def encode_png(image: Image.Image, *, provenance: dict[str, Any] | None = None) -> bytes:
    """PNG bytes of `image` (RGB, RGBA, L or LA; other modes are flattened to RGB), with `provenance` as JSON in
    the `klein-agent` text chunk. Non-ASCII text is escaped (tEXt is Latin-1)."""
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = to_rgb(image)
    fresh = Image.frombytes(image.mode, image.size, image.tobytes())
    pnginfo = None
    if provenance is not None:
        pnginfo = PngImagePlugin.PngInfo()
        text = json.dumps(provenance, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        pnginfo.add_text(PROVENANCE_KEY, text, zip=False)
    buf = io.BytesIO()
    fresh.save(buf, format="PNG", pnginfo=pnginfo, compress_level=COMPRESS_LEVEL)
    return buf.getvalue()
