"""The PNG format of every picture klein-agent writes: the store's files, exports and CLI outputs.

Pixels only, from a fresh buffer, so nothing of an input file (EXIF, GPS, ICC profile, text chunks) rides along;
the one piece of metadata is a `klein-agent` tEXt chunk of compact JSON provenance (the recipe). The same pixels
and provenance give the same bytes: keys are sorted and Pillow writes no timestamp.
"""

from __future__ import annotations

import io
import json
import zlib
from typing import Any

from PIL import Image, PngImagePlugin

from klein_agent.service.pixels import to_rgb

PROVENANCE_KEY = "klein-agent"

# zlib level 1 with the run-length strategy (Z_RLE: matches at distance 1, which is what PNG's filtered rows of a
# photo-like picture repeat), `python tools/bench_png.py PHOTO...` on this machine's CPU: two 720x477 photos
# resized to 1024² took 80 / 82 ms for 1.21 / 1.60 MB, against 92 / 100 ms and 1.40 / 1.77 MB at plain level 1
# and 412 / 400 ms and 1.22 / 1.59 MB at level 6 (Pillow's default): faster than level 1 and within 1% of level
# 6's bytes. On a UI screenshot (text: repeats at longer distances) it costs 3% more bytes than level 1 at the same
# speed; Z_HUFFMAN_ONLY was 2.5x larger there. Noise (the tiny test model's pictures) is incompressible at any
# setting: 256² in 4.9 ms against 8.8 ms at level 1.
COMPRESS_LEVEL = 1
COMPRESS_TYPE = zlib.Z_RLE


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
    fresh.save(buf, format="PNG", pnginfo=pnginfo, compress_level=COMPRESS_LEVEL, compress_type=COMPRESS_TYPE)
    return buf.getvalue()
