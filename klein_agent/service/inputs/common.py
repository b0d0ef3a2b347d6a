"""What every input module shares: the error type, the loaded-image record, and message helpers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from klein_agent.rules.quoting import ellipsize, show

__all__ = [
    "ATTACHMENT_HINT",
    "MAX_ARG_CHARS",
    "ImageInputError",
    "LoadedImage",
    "Source",
    "content_key",
    "ellipsize",  # re-exported: the one form lives in rules.quoting
    "show",
    "too_big_error",
]

Source = Literal["image_id", "path", "data_uri", "url"]


class ImageInputError(ValueError):
    """An image argument that cannot be used. The message says why and how to fix it."""


@dataclass(frozen=True)
class LoadedImage:
    """One decoded image argument: the picture, where it came from, and a short description for messages."""

    image: Image.Image  # RGB, EXIF orientation applied, fully loaded (no open file behind it)
    source: Source
    image_id: str | None  # set when it came from the store
    description: str  # short, for summaries: "img_…", "cat.png (JPEG, 800x600)", "data: URI (PNG, 512x512)"
    content_key: str | None = None  # sha256 of the encoded bytes, for an input from outside the store


def content_key(data: bytes) -> str:
    """The key under which an input's bytes are stored once, however often they are sent."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


MAX_ARG_CHARS = 4096  # for everything but data: URIs and bare base64; PATH_MAX on Linux

ATTACHMENT_HINT = (
    "If the user attached the image in the chat, it is not on this machine's disk: ask the user for a local "
    "path, or pass the image as a data:image/png;base64,... URI."
)


def too_big_error(what: str, size: int, cap: int) -> ImageInputError:
    """The error for an input of `size` bytes over the `cap` in bytes, both shown in MiB."""
    return ImageInputError(
        f"{show(what) if what.startswith(('/', '~')) else what} is {size / 2**20:.1f} MiB, over the "
        f"{cap / 2**20:.1f} MiB limit: downscale or re-encode it (JPEG or WebP are smaller) and try again"
    )
