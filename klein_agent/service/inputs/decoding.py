"""Untrusted bytes to a loaded RGB picture: the one decoder every input goes through (CLI and server alike).

Only PNG, JPEG and WebP reach Pillow's decoders: the format is sniffed from the magic bytes first, and
`Image.open(..., formats=...)` keeps every other plugin (EPS and Ghostscript, TIFF, ...) out. The pixel count is read
from the header and checked before Pillow builds an image object, so a decompression bomb costs a few bytes of
parsing. Then: EXIF orientation applied, transparency composited on white, 16-bit scaled to 8 bits.

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

from PIL import Image, ImageOps, UnidentifiedImageError

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

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


def decode(
    data: bytes, *, max_pixels: int, reduce_to: int | None = REFERENCE_MAX_AREA
) -> tuple[Image.Image, str]:
    """Untrusted PNG/JPEG/WebP bytes -> (a loaded RGB picture, its format), or ImageInputError.

    Checks, in order: format from the magic bytes (nothing else reaches Pillow); pixel count from the header
    against min(max_pixels, Pillow's MAX_IMAGE_PIXELS) and, for a picture decoded at full size (PNG, WebP, a
    JPEG when `reduce_to` is None), against `limits.FULL_DECODE_MAX_PIXELS` (the message says the cap and why);
    Pillow's lazy open restricted to the three formats; side >= 64 px and aspect <= 8; then decoding, EXIF
    orientation and `pixels.to_rgb`. Any decoder failure becomes ImageInputError.

    `reduce_to` (pixels; by default the ~1 Mpx a reference is scaled to): a JPEG of more than 4x this area is
    decoded at a reduced scale (libjpeg's DCT scaling, Pillow's `draft`) that keeps at least twice the linear size
    of `reduce_to`, so the later Lanczos scaling to about `reduce_to` pixels still has detail to average, and a
    48 Mpx photo never exists at full size in memory (docs/reference-parity.md gives the measured difference).
    """
    if not data:
        raise ImageInputError("the image is empty (0 bytes): pass a PNG, JPEG or WebP file")
    kind = _sniff_format(data)
    if kind not in ALLOWED_FORMATS:
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
    size = _header_size(data, kind)
    if size is not None:
        _check_geometry(*size, limit, _full_decode_format(kind, reduce_to))

    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Reached only when our header parser could not read the size (then Pillow's own check fires). The
        # warning arrives as an exception when a warnings filter escalates it (pytest does, for example).
        raise ImageInputError(
            "the image header declares more pixels than Pillow allows (decompression bomb guard): downscale it"
        ) from None
    except UnidentifiedImageError:
        raise ImageInputError(
            f"the {kind} data is corrupt or truncated (its header cannot be read): re-export or re-encode it"
        ) from None
    except Exception as e:
        # Untrusted-input boundary: any parser failure is the input's fault, not the server's.
        raise _corrupt_error(kind, e) from None

    fmt = "JPEG" if img.format == "MPO" else (img.format or kind)  # MPO: multi-picture JPEG from cameras
    try:
        if fmt not in ALLOWED_FORMATS:
            raise ImageInputError(
                f"unsupported format {fmt}; use PNG, JPEG or WebP (convert the image first)"
            )
        _check_geometry(img.width, img.height, limit, _full_decode_format(fmt, reduce_to))
        try:
            if reduce_to is not None and fmt == "JPEG" and img.width * img.height > 4 * reduce_to:
                keep = math.sqrt(4 * reduce_to / (img.width * img.height))
                img.draft("RGB", (math.ceil(img.width * keep), math.ceil(img.height * keep)))
            img.load()
            _apply_orientation(img)
            rgb = to_rgb(img)
        except ImageInputError:
            raise
        except Exception as e:  # see above: truncated streams, bad CRCs, decoder errors, MemoryError, ...
            raise _corrupt_error(fmt, e) from None
    finally:
        img.close()
    return rgb, fmt


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


def _sniff_format(data: bytes) -> str | None:
    """Name the format from magic bytes. Used to keep non-allowed formats away from Pillow entirely, and to
    tell the user what they sent."""
    head = data[:32]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "EPS"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head[4:8] == b"ftyp":
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIC"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith(b"DDS "):
        return "DDS"
    if head.startswith(b"\x76\x2f\x31\x01"):
        return "OpenEXR"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"\x00\x00\x02\x00"):
        return "CUR"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF":
        return "RIFF (not WebP)"
    text = data[:1024].lstrip().lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in text:
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if len(head) >= 2 and head[0] == ord("P") and head[1] in b"1234567":
        return "PNM"
    return None


def _header_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """Width and height from the header, or None when the header cannot be read (Pillow then decides)."""
    try:
        if kind == "PNG":
            if data[12:16] != b"IHDR" or len(data) < 24:
                return None
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if kind == "WEBP":
            return _webp_size(data)
        if kind == "JPEG":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if i + 2 > n:
            return None
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if i + 7 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 3 : i + 7])
            return w, h
        i += length
    return None
