"""How FLUX 3 [klein] prepares its references, as diffusers' `Flux3ImageProcessor` does (0.42.1).

- One reference is kept whole: scaled down (Lanczos, keeping the aspect ratio) until its *canvas* (each side
  rounded up to 16 px, at least 64, at most 4096) fits 4 Mpx, then centred on that canvas and reflect-padded
  (mirrored when a side is 16 px or less). The picture made on the canvas is cropped back to the box the reference
  occupies, unless the caller gave a size.
- Several references are each scaled down to at most ~1 Mpx and centre-cropped to multiples of 16 px: FLUX.2's rule
  (`references.prepare_reference`), which diffusers copies.
No torch: the server and the CLI can size a call before a model loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from klein_agent.rules.limits import MIN_SIDE, SIZE_MULTIPLE
from klein_agent.rules.references import prepare_reference
from klein_agent.rules.resolution import flux2_reference_sizes

CANVAS_MAX_AREA = 4 * 1024 * 1024  # diffusers `_resize_if_canvas_exceeds_area` target_area
CANVAS_MAX_SIDE = 4096
CANVAS_BACKOFF = 0.995  # the scale shrinks 0.5% per try until the rounded-up canvas fits

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in px


@dataclass(frozen=True)
class PreparedReferences:
    """The references as the model sees them, and the box to crop the picture back to (one reference only)."""

    images: list[Image.Image]
    crop: Box | None


def canvas_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) rounded up to 16 px, clamped to [64, 4096] per side."""
    return tuple(  # type: ignore[return-value]
        min(CANVAS_MAX_SIDE, max(MIN_SIDE, -(-side // SIZE_MULTIPLE) * SIZE_MULTIPLE))
        for side in (width, height)
    )


def fitted_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) a single reference of this size is scaled down to so its canvas fits 4 Mpx and 4096 px a
    side; the same size when it already fits (so fitting a fitted picture again changes nothing)."""
    scale = min(1.0, math.sqrt(CANVAS_MAX_AREA / (width * height)), CANVAS_MAX_SIDE / max(width, height))
    while True:
        new_h, new_w = (max(1, round(side * scale)) for side in (height, width))
        canvas_w, canvas_h = canvas_size(new_w, new_h)
        if canvas_w * canvas_h <= CANVAS_MAX_AREA:
            return new_w, new_h
        scale *= CANVAS_BACKOFF


def fit_canvas(image: Image.Image) -> Image.Image:
    """`image` scaled down (Lanczos) so its canvas fits 4 Mpx and 4096 px a side; unchanged when it already does."""
    size = fitted_size(*image.size)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def canvas_box(width: int, height: int) -> Box:
    """Where a fitted reference of this size sits on its canvas: centred, (left, top, right, bottom) in px."""
    canvas_w, canvas_h = canvas_size(width, height)
    left, top = (canvas_w - width) // 2, (canvas_h - height) // 2
    return left, top, left + width, top + height


def pad_to_canvas(image: Image.Image) -> tuple[Image.Image, Box]:
    """An RGB `image` centred on its canvas with the margins mirrored, and the box it occupies there."""
    width, height = image.size
    canvas_w, canvas_h = canvas_size(width, height)
    box = canvas_box(width, height)
    top = box[1]
    if (canvas_w, canvas_h) == (width, height):
        return image, box
    padding = ((top, canvas_h - box[3]), (box[0], canvas_w - box[2]), (0, 0))
    # reflection leaves out the edge pixel, which needs more than one pixel; diffusers mirrors below one token
    pixels = np.asarray(image.convert("RGB"))
    if min(width, height) > SIZE_MULTIPLE:
        return Image.fromarray(np.pad(pixels, padding, mode="reflect")), box
    return Image.fromarray(np.pad(pixels, padding, mode="symmetric")), box


def prepare_flux3_references(images: Sequence[Image.Image]) -> PreparedReferences:
    """The references as FLUX 3 sees them: one on its padded canvas (with the crop-back box), several each
    prepared as FLUX.2 prepares one. Raises `resolution.RequestError` for a reference FLUX.2's rule refuses
    (a side under 64 px, an aspect over 8:1) when there are several; none for an empty list."""
    if len(images) == 1:
        padded, box = pad_to_canvas(fit_canvas(images[0].convert("RGB")))
        return PreparedReferences([padded], box)
    return PreparedReferences([prepare_reference(image) for image in images], None)


def flux3_reference_sizes(
    sizes: Sequence[tuple[int, int]], multiple: int = SIZE_MULTIPLE
) -> tuple[tuple[tuple[int, int], ...], Box | None]:
    """FLUX 3's `resolution.ReferenceRule`, by sizes alone (the server and the CLI size a call before the model
    loads): one reference -> its canvas (up to 4 Mpx) and the box the picture is cropped back to; several -> each
    prepared as FLUX.2 prepares one (checked: a side under 64 px or an aspect over 8:1 raises RequestError), no box.
    `multiple` must be 16 px, the token size the canvas rule is written for."""
    if multiple != SIZE_MULTIPLE:
        raise ValueError(f"FLUX 3 references are prepared on {SIZE_MULTIPLE} px tokens, not {multiple}")
    if len(sizes) == 1:
        fitted = fitted_size(*sizes[0])
        return (canvas_size(*fitted),), canvas_box(*fitted)
    return flux2_reference_sizes(sizes, multiple)


def prepare_flux3_input(image: Image.Image, count: int) -> Image.Image:
    """An input as decoded, made as small as FLUX 3 will use it, so a caller keeps (and stores) no more: the only
    reference of a call scaled down to fit its 4 Mpx canvas (`fit_canvas`: the pipeline pads it), one of several
    prepared as FLUX.2 prepares one. Preparing the result again changes nothing."""
    if count == 1:
        return fit_canvas(image.convert("RGB"))
    return prepare_reference(image)
