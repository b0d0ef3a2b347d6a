"""Inline images: `data:image/...;base64,...` URIs and bare base64, refused on length before any decoding."""

from __future__ import annotations

import base64
import binascii
import math
import re

from klein_agent.service.inputs.common import ImageInputError, LoadedImage, content_key, too_big_error
from klein_agent.service.inputs.decoding import decode
from klein_agent.service.inputs.policy import InputPolicy

_B64_BODY_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")

# Bare base64 (no data: prefix) is recognised by the encoded magic bytes of the three allowed formats.
_BARE_B64_PREFIXES = ("iVBORw0KGgo", "/9j/", "UklGR")

_DATA_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}


def looks_like_bare_base64(arg: str) -> bool:
    """Whether `arg` is base64 with no data: prefix: 64+ characters that start as PNG, JPEG or WebP do."""
    return len(arg) >= 64 and arg.startswith(_BARE_B64_PREFIXES)


def load_data_uri(arg: str, policy: InputPolicy) -> LoadedImage:
    """Decode a `data:image/{png,jpeg,webp};base64,...` URI under the policy's byte and pixel limits.

    Raises ImageInputError for a malformed header, another MIME type, a payload that is not base64, one over
    `policy.max_bytes`, or bytes that do not decode as an allowed image.
    """
    comma = arg.find(",", 0, 256)
    if comma < 0:
        raise ImageInputError(
            "malformed data: URI (no comma after the header): use data:image/png;base64,<base64 of the file>"
        )
    header = arg[5:comma].strip().lower()
    params = [p.strip() for p in header.split(";")]
    mime = params[0]
    if mime not in _DATA_MIME:
        raise ImageInputError(
            f"data: URI declares {mime or 'no type'!r}; only image/png, image/jpeg and image/webp are accepted: "
            "convert the image to PNG, JPEG or WebP first"
        )
    if "base64" not in params[1:]:
        raise ImageInputError(
            "data: URI must be base64-encoded: use data:image/png;base64,<base64 of the file>"
        )
    # A declared MIME that disagrees with the bytes is not rejected: the bytes are sniffed and decoded under
    # the same allowlist, and the label carries no risk. The description reports what was found.
    return load_base64(arg, comma + 1, policy, what="data: URI")


def load_base64(arg: str, start: int, policy: InputPolicy, *, what: str) -> LoadedImage:
    """Decode `arg[start:]`; `start` instead of a slice so an oversized payload is never copied."""
    data = _b64decode_capped(arg, start, policy.max_bytes, what)
    image, fmt = decode(data, max_pixels=policy.max_pixels, reduce_to=policy.reduce_to)
    return LoadedImage(
        image=image,
        source="data_uri",
        image_id=None,
        description=f"{what} ({fmt}, {image.width}x{image.height})",
        content_key=content_key(data),
    )


def _b64decode_capped(arg: str, start: int, max_bytes: int, what: str) -> bytes:
    max_b64 = 4 * math.ceil(max_bytes / 3)
    # Checked on the raw length first (with slack for line breaks), so a 200 MB argument is refused in O(1).
    raw_len = len(arg) - start
    if raw_len > max_b64 + max_b64 // 32 + 1024:
        raise too_big_error(what, raw_len * 3 // 4, max_bytes)
    compact = re.sub(r"\s+", "", arg[start:])  # MIME-style line wrapping is common in what agents paste
    if len(compact) > max_b64:
        raise too_big_error(what, len(compact) * 3 // 4, max_bytes)
    raw = compact.encode("ascii", "replace")
    if "-" in compact or "_" in compact:  # tolerate URL-safe base64
        raw = raw.translate(bytes.maketrans(b"-_", b"+/"))
    if not _B64_BODY_RE.fullmatch(raw) or len(raw) % 4 == 1:
        raise ImageInputError(
            f"{what} is not valid base64 (characters outside A-Z a-z 0-9 + / =, or a bad length): encode the "
            "file bytes with standard base64"
        )
    raw += b"=" * (-len(raw) % 4)  # restore stripped padding
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(
            f"{what} is not valid base64: encode the file bytes with standard base64"
        ) from None
    if len(data) > max_bytes:
        raise too_big_error(what, len(data), max_bytes)
    return data
