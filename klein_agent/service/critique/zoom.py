"""A region of a stored picture at full resolution, for view_image: the same box rule as inpaint's (pixels, or
fractions when all four values are at most 1), so a compare_images box can be passed straight in."""

from __future__ import annotations

from PIL import Image

from klein_agent.rules.limits import ZOOM_MIN_EDGE
from klein_agent.rules.masks import Box, box_rectangle


def region_rectangle(region: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The region as (x, y, width, height) in whole pixels of a picture of `size`, clipped to it. Raises
    RequestError naming "region" when it is inverted, empty, outside the picture or under one pixel."""
    left, top, right, bottom = box_rectangle(region, size, name="region")
    return left, top, right - left, bottom - top


def zoom(picture: Image.Image, region: Box | None, *, max_edge: int) -> Image.Image:
    """`picture` itself when `region` is None; else the `region` of `picture` at full resolution (1 px of the picture is 1 px here). A region whose long edge
    is under ZOOM_MIN_EDGE is enlarged by a whole factor with nearest-neighbour sampling (each pixel becomes a
    sharp square, nothing is invented), to at most ZOOM_MIN_EDGE and `max_edge`; the caller's preview step
    scales down a region larger than `max_edge`. Raises RequestError as `region_rectangle`."""
    if region is None:
        return picture
    x, y, w, h = region_rectangle(region, picture.size)
    crop = picture.crop((x, y, x + w, y + h))
    factor = max(1, min(ZOOM_MIN_EDGE, max_edge) // max(w, h))
    if factor > 1:
        crop = crop.resize((w * factor, h * factor), Image.Resampling.NEAREST)
    return crop
