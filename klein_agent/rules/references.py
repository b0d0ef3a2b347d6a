"""A reference picture as the model sees it, with PIL only (no torch): scaled down to about 1 Mpx and cropped to
whole tokens, exactly as diffusers' `Flux2KleinPipeline.__call__` prepares `image` (with `Flux2ImageProcessor`).

The pipeline prepares every reference with it, and the studio and the CLI prepare inputs with it as soon as they are
decoded, so only the prepared picture is kept (and stored as the import): preparing a prepared picture again
changes nothing.
"""

from __future__ import annotations

from PIL import Image

from klein_agent.rules.limits import REFERENCE_MAX_AREA, SIZE_MULTIPLE
from klein_agent.rules.resolution import check_reference_geometry, prepared_reference_size

# Set in a prepared picture's `info`: (multiple, original width, original height). The rules check the original's
# geometry, and preparing again with the same multiple returns the picture as it is.
PREPARED = "klein-agent-prepared"


def prepared_with(image: Image.Image, multiple: int, mark: str = PREPARED) -> bool:
    """Whether `image` carries `mark` (PREPARED, or masks.SOURCE_PREPARED) set for this `multiple`."""
    value = image.info.get(mark)
    return isinstance(value, tuple) and len(value) == 3 and value[0] == multiple


def original_size(image: Image.Image) -> tuple[int, int]:
    """The size a picture had before `prepare_reference`, or its own size if it was not prepared."""
    mark = image.info.get(PREPARED)
    return (mark[1], mark[2]) if isinstance(mark, tuple) and len(mark) == 3 else image.size


def scale_to_reference_area(image: Image.Image) -> Image.Image:
    """`image` scaled down (Lanczos) to at most ~1 Mpx, as diffusers caps a reference before it crops (or, for an
    inpaint source, resizes) to whole tokens. Raises `resolution.RequestError` for a side under 64 px or an aspect
    over 8:1 of the original picture."""
    check_reference_geometry(*original_size(image))
    w, h = image.size
    if w * h > REFERENCE_MAX_AREA:
        return image.resize(prepared_reference_size(w, h, 1), Image.Resampling.LANCZOS)
    return image


def prepare_reference(image: Image.Image, multiple: int = SIZE_MULTIPLE) -> Image.Image:
    """An RGB reference as the model sees it: scaled down (Lanczos) to at most ~1 Mpx, then center-cropped to
    multiples of `multiple` px. Raises `resolution.RequestError` for a side under 64 px or an aspect over 8:1 (of
    the original). A picture this function already prepared with the same `multiple` comes back unchanged."""
    if prepared_with(image, multiple):
        return image
    original = original_size(image)
    image = scale_to_reference_area(image)
    w, h = image.size
    cw, ch = prepared_reference_size(w, h, multiple)
    left, top = (w - cw) // 2, (h - ch) // 2
    prepared = image.crop((left, top, left + cw, top + ch)).convert("RGB")
    prepared.info = {PREPARED: (multiple, *original)}
    return prepared
