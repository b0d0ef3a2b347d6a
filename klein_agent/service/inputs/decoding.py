"""Untrusted bytes to a loaded RGB picture: the one decoder every input goes through (CLI and server alike).

Only PNG, JPEG and WebP reach a Pillow parser. The format is named by Pillow's own signature checks (the `accept`
function each plugin registers, which reads 16 bytes and parses nothing); for PNG, JPEG and WebP that plugin's image
class then reads the header only, and the pixel count is checked before anything is decoded, so a decompression
bomb costs a header's parsing. Then: EXIF orientation applied, transparency composited on white, 16-bit scaled to
8 bits.

What Pillow lacks, and so what stays here (checked in Pillow 13's source):
- `Image.open` runs Pillow's own bomb check (`MAX_IMAGE_PIXELS`: a warning over 89.5 Mpx, DecompressionBombError
  over twice that) before it returns the image, so our limit and its actionable message could not come first. The
  plugin's image class is therefore constructed directly (what `Image.open` does inside, minus that check), and our
  limit is never above `MAX_IMAGE_PIXELS`, so Pillow's guard stays on for the rest of the process and never fires
  for what we let through.
- A WebP is not lazy: its plugin creates libwebp's animation decoder inside the open, which allocates two
  canvas-size buffers (4 bytes a pixel each) before the size is known to us, and Pillow guards that only at its own
  2 x MAX_IMAGE_PIXELS. So the WebP canvas size is read from the first chunk here first (`_webp_canvas_size`).
- Pillow has no reader for HEIC, PDF (it only writes it), SVG or HTML, so it cannot name them; `_non_pillow_format`
  names those four, which users send by mistake (a phone photo, a document, a vector drawing, an error page).
No other check is needed for what Pillow opens lazily: a PNG's and a JPEG's decode allocates the size their header
gave (`ImageFile.load_prepare`), APNG and animated WebP frames must lie inside that canvas (Pillow and libwebp
refuse others) and only the first is decoded, and EXIF orientation swaps the sides, which the pixel cap, the
minimum side and the aspect rule do not depend on.

Memory: a JPEG of which only ~1 Mpx will be used is decoded at a reduced scale; PNG and WebP cannot be, so they
have lower pixel caps (`limits.FULL_DECODE_MAX_PIXELS`), sized so that a full-size decode stays inside
`limits.FULL_DECODE_BUDGET_BYTES`. Orientation is applied in place and the RGB conversion runs in strips, so a
decode holds the loaded picture, the decoder's buffers and the one RGB result, never further full-size copies.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from collections.abc import Callable
from typing import IO

from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from klein_agent.rules.limits import (
    FULL_DECODE_BYTES_PER_PIXEL,
    FULL_DECODE_MAX_PIXELS,
    REFERENCE_MAX_AREA,
)
from klein_agent.rules.limits import REFERENCE_MAX_ASPECT as MAX_ASPECT
from klein_agent.rules.limits import REFERENCE_MIN_SIDE as MIN_SIDE
from klein_agent.service.error_text import describe
from klein_agent.service.inputs.common import ImageInputError, ellipsize
from klein_agent.service.pixels import to_rgb

log = logging.getLogger(__name__)

# The image class of each accepted format's plugin: constructing one reads the header only (see the module
# docstring). JpegImageFile, not Pillow's JPEG factory, so a camera's MPO is read as the JPEG its first picture is.
_READERS: dict[str, Callable[[IO[bytes]], ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}
ALLOWED_FORMATS = tuple(_READERS)


def decode(
    data: bytes, *, max_pixels: int, reduce_to: int | None = REFERENCE_MAX_AREA
) -> tuple[Image.Image, str]:
    """Untrusted PNG/JPEG/WebP bytes -> (a loaded RGB picture, its format), or ImageInputError.

    Checks, in order: the format by Pillow's signature checks (another format is refused by name, where Pillow or
    `_non_pillow_format` can tell it); for a WebP, the canvas size from its first chunk; the header read by the
    format's own Pillow plugin; pixel count against min(max_pixels, Pillow's MAX_IMAGE_PIXELS) and, for a picture
    decoded at full size (PNG, WebP, a JPEG when `reduce_to` is None), against `limits.FULL_DECODE_MAX_PIXELS`
    (the message says the cap and why); side >= 64 px and aspect <= 8; then decoding, EXIF orientation and
    `pixels.to_rgb`. Any parser or decoder failure becomes ImageInputError.

    `reduce_to` (pixels; by default the ~1 Mpx a reference is scaled to): a JPEG of more than 4x this area is
    decoded at a reduced scale (libjpeg's DCT scaling, Pillow's `draft`) that keeps at least twice the linear size
    of `reduce_to`, so the later Lanczos scaling to about `reduce_to` pixels still has detail to average, and a
    48 Mpx photo never exists at full size in memory (docs/reference-parity.md gives the measured difference).
    """
    if not data:
        raise ImageInputError("the image is empty (0 bytes): pass a PNG, JPEG or WebP file")
    kind = _format_name(data)
    if kind not in _READERS:
        if kind is None:
            raise ImageInputError(
                "the data is not a PNG, JPEG or WebP image (unrecognised signature): pass one of those formats"
            )
        raise ImageInputError(f"unsupported format {kind}; use PNG, JPEG or WebP (convert the image first)")

    # Honour a stricter global Pillow limit if the host application set one, and stay at or under Pillow's
    # warning threshold so its DecompressionBombWarning cannot fire for anything we let through.
    limit = max_pixels
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit:
        limit = min(limit, pil_limit)
    full_decode = _full_decode_format(kind, reduce_to)
    if kind == "WEBP" and (canvas := _webp_canvas_size(data)) is not None:
        _check_geometry(*canvas, limit, full_decode)

    try:
        img = _READERS[kind](io.BytesIO(data))
    except SyntaxError:  # Pillow's "not identified": no readable header behind the signature
        raise ImageInputError(
            f"the {kind} data is corrupt or truncated (its header cannot be read): re-export or re-encode it"
        ) from None
    except Exception as e:
        # Untrusted-input boundary: any parser failure is the input's fault, not the server's.
        raise _corrupt_error(kind, e) from None

    try:
        _check_geometry(img.width, img.height, limit, full_decode)
        try:
            if reduce_to is not None and kind == "JPEG" and img.width * img.height > 4 * reduce_to:
                keep = math.sqrt(4 * reduce_to / (img.width * img.height))
                img.draft("RGB", (math.ceil(img.width * keep), math.ceil(img.height * keep)))
            img.load()
            _apply_orientation(img)
            rgb = to_rgb(img)
        except ImageInputError:
            raise
        except Exception as e:  # see above: truncated streams, bad CRCs, decoder errors, MemoryError, ...
            raise _corrupt_error(kind, e) from None
    finally:
        img.close()
    return rgb, kind


def _corrupt_error(fmt: str, e: BaseException) -> ImageInputError:
    detail = ellipsize(describe(e), 120)
    return ImageInputError(
        f"the {fmt} image is truncated or corrupt ({detail}): re-export it as PNG, JPEG or WebP and try again"
    )


def _full_decode_format(fmt: str, reduce_to: int | None) -> str | None:
    """`fmt` when a picture of it is decoded at full size (a key of FULL_DECODE_MAX_PIXELS), else None: a JPEG
    with `reduce_to` set is decoded at a reduced scale instead."""
    if fmt == "JPEG" and reduce_to is not None:
        return None
    return fmt if fmt in FULL_DECODE_MAX_PIXELS else None


def _check_geometry(width: int, height: int, max_pixels: int, full_decode: str | None = None) -> None:
    """Refuse an empty size, more than `max_pixels` (or, for a picture of format `full_decode` that is decoded
    at full size, more than its FULL_DECODE_MAX_PIXELS cap), a side under 64 px or an aspect over 8:1."""
    if width <= 0 or height <= 0:
        raise ImageInputError(
            f"the image header declares an empty size {width}x{height}: the file is corrupt"
        )
    pixels = width * height
    cap = FULL_DECODE_MAX_PIXELS[full_decode] if full_decode is not None else max_pixels
    if pixels > cap and cap < max_pixels:
        assert full_decode is not None
        raise _full_decode_error(width, height, full_decode, cap, max_pixels)
    if pixels > max_pixels:
        raise ImageInputError(
            f"the image is {width}x{height} ({pixels / 1e6:.1f} Mpx), over the {max_pixels / 1e6:.1f} Mpx limit: "
            "downscale it (for example to 2048 px on the long edge) and try again"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageInputError(
            f"the image is {width}x{height}; both sides must be at least {MIN_SIDE} px: upscale or pad it"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise ImageInputError(
            f"the image is {width}x{height}, aspect ratio {aspect:.1f}:1; at most {MAX_ASPECT:g}:1 is supported: "
            "crop or pad it"
        )


def _full_decode_error(width: int, height: int, fmt: str, cap: int, max_pixels: int) -> ImageInputError:
    pixels = width * height
    scale = math.sqrt(cap / pixels)
    fits = f"{math.floor(width * scale)}x{math.floor(height * scale)}"
    what = "a JPEG decoded at full size" if fmt == "JPEG" else f"a {'WebP' if fmt == 'WEBP' else fmt}"
    jpeg = f" or send it as a JPEG (accepted up to {max_pixels / 1e6:.1f} Mpx)" if fmt != "JPEG" else ""
    return ImageInputError(
        f"the image is {width}x{height} = {pixels / 1e6:.1f} Mpx; {what} is accepted up to {cap / 1e6:.1f} Mpx, "
        f"because it cannot be decoded at a reduced size (a full decode costs about "
        f"{FULL_DECODE_BYTES_PER_PIXEL[fmt]} bytes a pixel, and only about {REFERENCE_MAX_AREA / 1e6:.1f} Mpx of "
        f"it is used): scale it down (to {fits}, say){jpeg}"
    )


def _apply_orientation(img: Image.Image) -> None:
    """EXIF orientation applied to the loaded `img` in place (one transposed buffer, swapped in)."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as e:  # a broken EXIF block must not cost the user an otherwise good image
        log.debug("ignoring unreadable EXIF orientation: %s", e)


def _format_name(data: bytes) -> str | None:
    """The format the bytes' signature names, as Pillow calls it ("PNG", "GIF", "PPM", ...), else HEIC, PDF, SVG
    or HTML (`_non_pillow_format`), else None. Only signature checks run (16 bytes, as `Image.open` passes them);
    no other plugin parses the data, so nothing of EPS (Ghostscript), TIFF and the rest runs on untrusted input."""
    prefix = data[:16]
    for fmt in ALLOWED_FORMATS:  # registered by the imports above: the common case needs no Image.init()
        if _accepts(Image.OPEN[fmt][1], prefix):
            return fmt
    Image.init()  # imports every plugin, once, for its signature check
    for fmt, (_, accept) in Image.OPEN.items():
        if _accepts(accept, prefix):
            return fmt
    return _non_pillow_format(data)


def _accepts(accept: Callable[[bytes], bool | str] | None, prefix: bytes) -> bool:
    """Whether a plugin's signature check claims `prefix`. A plugin without one (TGA, ...) claims nothing; a string
    answer means "support not installed"; the errors are those `Image.open` also takes as "not this format"."""
    try:
        return accept is not None and accept(prefix) is True
    except (SyntaxError, IndexError, TypeError, struct.error):  # unpacking bytes a short prefix lacks
        return False


def _non_pillow_format(data: bytes) -> str | None:
    """HEIC, PDF, SVG or HTML from the first bytes, else None. Pillow has no reader for these (PDF it only writes),
    so it cannot name them, and they are what users send by mistake: a phone photo, a document, a vector drawing,
    an error page saved in place of the picture."""
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"):
        return "HEIC"  # Pillow names the AVIF brands (and the generic mif1/msf1) itself
    if data.startswith(b"%PDF"):
        return "PDF"
    text = data[:1024].lstrip().lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in text:
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    return None


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """A WebP's canvas width and height from its first chunk (VP8X, VP8L or VP8), or None when unreadable.

    Pillow's WebP open allocates libwebp's two canvas buffers before it returns (module docstring), and its own
    reader of this size is private (`WebPImagePlugin._get_size`), so the same few lines live here. None means the
    chunk is truncated or malformed: Pillow's reader has no size to check either."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w = int.from_bytes(data[26:28], "little")
        h = int.from_bytes(data[28:30], "little")
        return w & 0x3FFF, h & 0x3FFF
    return None
