"""Masked edits (inpainting): the source picture, the mask, boxes and strength, as diffusers'
`Flux2KleinInpaintPipeline.__call__` (steps 2, 5 and 6) prepares them. PIL only, no torch: the CLI and the server
check a masked edit with these before any model work, and the pipeline prepares its inputs with the same functions.

The reference's rules, mirrored:
- the source is scaled down (Lanczos, sides truncated) to at most ~1 Mpx, then *resized* (not cropped, unlike a
  reference image) to whole tokens; the output has that size;
- the mask is resized (Lanczos, in its own mode) to the output size, turned to grayscale, and binarized at half
  level (white repaints, black keeps); the model then reads it per 16 px token, bilinearly, which samples the
  four pixels at each token's centre.

Our rules on top: a mask of another aspect ratio than the source is refused (the reference would stretch it over
the picture, which is almost always a mask drawn for another picture), as is a mask that repaints no token and a
strength outside (0, 1]. "The source" is both the picture as given and as the model sees it: flooring the sides to
whole tokens can change the aspect by far more than 2% (333x517 -> 320x512, 100x70 -> 96x64), and a mask of either
shape is one drawn for this picture (the prepared mask the CLI and the studio pass on is of the second). A full
mask is allowed: everything is repainted, starting from the noised source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from klein_agent.rules import limits
from klein_agent.rules.references import PREPARED, original_size, prepared_with, scale_to_reference_area
from klein_agent.rules.resolution import RequestError, check_finite, number_text, prepared_reference_size

SOURCE_PREPARED = "klein-agent-inpaint-source"  # set in a prepared source's `info`: (multiple, original w, h)


@dataclass(frozen=True)
class Box:
    """A rectangle to repaint: left, top, width, height, in pixels of the source as given, or, when all four are
    at most 1, in fractions of its width and height."""

    x: float
    y: float
    width: float
    height: float

    @property
    def fractional(self) -> bool:
        """Whether the values are fractions of the picture (all four at most 1) rather than pixels."""
        return all(v <= 1 for v in (self.x, self.y, self.width, self.height))

    def as_list(self) -> list[float]:
        """[x, y, width, height], as a recipe records it (whole pixels as ints)."""
        return [int(v) if float(v).is_integer() and not self.fractional else v for v in self._values()]

    def _values(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.width, self.height)


BOX_FIELDS = ("x", "y", "width", "height")
BOX_FORM = "[x, y, width, height]"

# A JSON value's type in words, for "got ..." in messages (bool before int: True is an int in Python).
_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"),
    ((int, float), "a number"),
    (str, "a string"),
    ((list, tuple), "a list"),
    (dict, "an object"),
    (type(None), "null"),
)


def kind_of(value: object) -> str:
    """A JSON value's type in words ("a string", "a list", "null"), as messages name what they got."""
    return next((words for kinds, words in _KINDS if isinstance(value, kinds)), "a value")


def box_from_values(values: object, number: int = 1, name: str | None = None) -> Box:
    """Box `number` (from 1) from its four values as a caller gave them (a JSON list, or the CLI's parsed floats).
    Raises RequestError naming the box (or `name`, e.g. "region") and the field for anything but four finite
    numbers; the CLI and the server share these messages."""
    label = name or f"box {number}"
    if not isinstance(values, list | tuple):
        raise RequestError(f"{label} must be a list {BOX_FORM}, got {kind_of(values)}")
    if len(values) != len(BOX_FIELDS):
        raise RequestError(f"{label} has {len(values)} numbers: give {BOX_FORM}")
    for field, value in zip(BOX_FIELDS, values, strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(f"{label}: {field} must be a number, got {kind_of(value)}")
        check_finite(value, f"{label}: {field}")
    return Box(*(float(v) for v in values))


def boxes_from(value: object) -> list[Box]:
    """The server's `boxes` argument (JSON: a list of [x, y, width, height] lists; None for none) -> Boxes, at most
    MAX_BOXES. Raises RequestError naming the type it got, the box and the field (`box_from_values`)."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise RequestError(f"boxes must be a list of {BOX_FORM} boxes, got {kind_of(value)}")
    if value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise RequestError(
            f"boxes must be a list of {BOX_FORM} boxes, got a list of numbers: put each box in its own list, "
            f"e.g. [[{', '.join(number_text(v) for v in value)}]]"
        )
    if len(value) > limits.MAX_BOXES:
        raise RequestError(f"{len(value)} boxes given; at most {limits.MAX_BOXES}")
    return [box_from_values(item, k) for k, item in enumerate(value, start=1)]


def parse_box(text: str, number: int = 1) -> Box:
    """`X,Y,W,H` (the CLI's --box, the `number`th from 1) -> Box. Raises RequestError for text that is not four
    numbers, and with the server's message (`box_from_values`) for NaN or an infinity."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != len(BOX_FIELDS):
        raise RequestError(
            f"--box {text!r} is not X,Y,W,H: give four numbers, in pixels (--box 40,60,200,120) or in fractions of "
            "the image (--box 0.1,0.2,0.5,0.3)"
        )
    return box_from_values(values, number)


def box_rectangle(
    box: Box, size: tuple[int, int], number: int = 1, name: str | None = None
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in whole pixels of a picture of `size` (width, height), clipped to it. Raises
    RequestError, naming box `number` (or `name`), for a negative or empty box, for one entirely outside the
    picture, and for one that covers no whole pixel once rounded."""
    w, h = size
    label = name or f"box {number}"
    if min(box.x, box.y) < 0 or box.width <= 0 or box.height <= 0:
        raise RequestError(
            f"{label} {box.as_list()} is not a region: x and y must be at least 0, width and height above 0"
        )
    scale_x, scale_y = (w, h) if box.fractional else (1, 1)
    left, top = round(box.x * scale_x), round(box.y * scale_y)
    right, bottom = round((box.x + box.width) * scale_x), round((box.y + box.height) * scale_y)
    if left >= w or top >= h:
        unit = "fractions" if box.fractional else "pixels"
        raise RequestError(
            f"{label} {box.as_list()} ({unit}) lies outside the {w}x{h} image: x must be under {w} px and y "
            f"under {h} px (or use fractions, all four at most 1)"
        )
    right, bottom = min(right, w), min(bottom, h)
    if right <= left or bottom <= top:
        raise RequestError(
            f"{label} {box.as_list()} covers less than one pixel of the {w}x{h} image: make it at least 1 px "
            f"(or 1/{max(w, h)} as a fraction) wide and high"
        )
    return left, top, right, bottom


def boxes_mask(boxes: Sequence[Box], size: tuple[int, int]) -> Image.Image:
    """A grayscale mask of `size` (the source as given): white inside the boxes, black elsewhere. Raises
    RequestError for no boxes, too many, or a box that is not a region inside the picture."""
    if not boxes:
        raise RequestError("no mask and no boxes given: pass a mask image or at least one box to repaint")
    if len(boxes) > limits.MAX_BOXES:
        raise RequestError(f"{len(boxes)} boxes given; at most {limits.MAX_BOXES}")
    mask = Image.new("L", size, 0)
    for k, box in enumerate(boxes, start=1):
        mask.paste(255, box_rectangle(box, size, k))
    return mask


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether sizes `a` and `b` (width, height) have aspect ratios within MASK_MAX_ASPECT_DIFFERENCE."""
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1]))) <= math.log1p(limits.MASK_MAX_ASPECT_DIFFERENCE)


def check_mask_aspect(
    mask_size: tuple[int, int], source_size: tuple[int, int], output_size: tuple[int, int] | None = None
) -> None:
    """Raises RequestError when a mask's aspect ratio differs by more than 2% from both the source's as given
    (`source_size`) and as the model sees it (`output_size`, the sides floored to whole tokens, when given): it
    would be stretched over the picture, so it was almost surely drawn for another one."""
    if _same_aspect(mask_size, source_size) or (
        output_size is not None and _same_aspect(mask_size, output_size)
    ):
        return
    (mw, mh), (sw, sh) = mask_size, source_size
    seen = (
        ""
        if output_size in (None, source_size)
        else f" (the model sees it at {output_size[0]}x{output_size[1]})"
    )
    raise RequestError(
        f"the mask is {mw}x{mh} but the image is {sw}x{sh}{seen}: their aspect ratios differ, so the mask would "
        "be stretched over the picture. Draw the mask on the image itself (any size with its aspect ratio "
        "works), or name the region with boxes"
    )


def fit_mask(mask: Image.Image, source: Image.Image, multiple: int = limits.SIZE_MULTIPLE) -> Image.Image:
    """`mask` as the model reads it for `source` (decoded or prepared): checked for its aspect ratio against the
    source as given and as prepared, resized to the output size and binarized (`prepare_mask`), checked to repaint
    at least one token. The one mask check of the CLI, the studio and `requests.resolve`, so a mask it returns
    passes it again. Raises RequestError for a mask of another aspect ratio or one that repaints nothing."""
    output = source_size(source, multiple)
    check_mask_aspect(mask.size, original_size(source), output)
    prepared = prepare_mask(mask, output)
    check_mask(prepared, multiple)
    return prepared


def prepare_source(image: Image.Image, multiple: int = limits.SIZE_MULTIPLE) -> Image.Image:
    """The picture to repaint as the model sees it: scaled down (Lanczos) to at most ~1 Mpx, then resized to whole
    tokens of `multiple` px (diffusers resizes the inpaint source where it crops a reference). Raises
    RequestError for a side under 64 px or an aspect over 8:1. A prepared source comes back unchanged."""
    if prepared_with(image, multiple, SOURCE_PREPARED):
        return image
    original = original_size(image)
    image = scale_to_reference_area(image)
    w, h = image.size
    target = ((w // multiple) * multiple, (h // multiple) * multiple)
    prepared = image.resize(target, Image.Resampling.LANCZOS).convert("RGB")
    prepared.info = {SOURCE_PREPARED: (multiple, *original), PREPARED: (multiple, *original)}
    return prepared


def source_size(image: Image.Image, multiple: int = limits.SIZE_MULTIPLE) -> tuple[int, int]:
    """The output (width, height) of a masked edit of `image`: the source as `prepare_source` makes it."""
    if prepared_with(image, multiple, SOURCE_PREPARED):
        return image.size
    return prepared_reference_size(*original_size(image), multiple)


def prepare_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask as the model reads it at the output `size`: resized (Lanczos, in the mask's own mode), grayscale,
    binarized (255 repaints, 0 keeps). Preparing a prepared mask changes nothing."""
    if mask.mode == "L" and mask.size == size and set(mask.histogram()[1:255]) == {0}:
        return mask
    gray = mask.resize(size, Image.Resampling.LANCZOS).convert("L")
    return gray.point(lambda v: 255 if v >= limits.MASK_THRESHOLD else 0)


def covered_tokens(mask: Image.Image, multiple: int = limits.SIZE_MULTIPLE) -> int:
    """How many latent tokens a prepared mask repaints at all: bilinear sampling down by `multiple` (even) reads
    the 2x2 pixels at each token's centre, so a token counts when one of them is white."""
    w, h = mask.size
    pixels = mask.load()
    assert pixels is not None
    half = multiple // 2
    rows = [(i * multiple + half - 1, i * multiple + half) for i in range(h // multiple)]
    cols = [(j * multiple + half - 1, j * multiple + half) for j in range(w // multiple)]
    return sum(
        1
        for r in rows
        for c in cols
        if any(pixels[x, y] for y in r for x in c)  # type: ignore[index]
    )


def check_mask(mask: Image.Image, multiple: int = limits.SIZE_MULTIPLE) -> None:
    """Raises RequestError when a prepared mask repaints no token (all black, or white areas that fall between
    token centres)."""
    if covered_tokens(mask, multiple) == 0:
        raise RequestError(
            "the mask repaints nothing: it is all black, or its white areas are too thin to cover any "
            f"{multiple} px token of the {mask.width}x{mask.height} output. Paint the area to change white "
            f"(at least {multiple} px wide), or name it with a box"
        )


def check_strength(strength: float) -> float:
    """`strength` as a float; raises RequestError unless a finite number with 0 < strength <= 1."""
    check_finite(strength, "strength")
    if not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise RequestError(
            f"strength must be above 0 and at most 1, got {number_text(strength)}: 1 repaints the masked area from noise, "
            f"lower values keep more of it (default {limits.DEFAULT_STRENGTH})"
        )
    return float(strength)


def first_step(steps: int, strength: float) -> int:
    """How many of the schedule's `steps` a masked edit of `strength` skips, exactly as the reference counts
    (`get_timesteps`: int(max(steps - min(steps * strength, steps), 0))). Raises RequestError when none is left."""
    start = int(max(steps - min(steps * strength, steps), 0))
    if steps - start < 1:
        raise RequestError(
            f"strength {strength} with {steps} steps leaves no step to run: raise strength or steps"
        )
    return start


@dataclass(frozen=True)
class MaskRequest:
    """How a caller names the region of a masked edit: a mask argument (an id, path or URI; the caller decodes
    it) or boxes, and the strength. The server and the CLI check it with `check` before loading anything."""

    mask: str | None
    boxes: Sequence[Box]
    strength: float | None

    def check(self) -> None:
        """Raises RequestError for both a mask and boxes, neither, too many boxes, or a strength outside (0, 1]."""
        if self.mask is not None and self.boxes:
            raise RequestError(
                "give a mask or boxes, not both: draw the boxes into the mask, or drop the mask"
            )
        if self.mask is None and not self.boxes:
            raise RequestError(
                "no mask and no boxes given: pass a mask image (white repaints, black keeps) or at least one box "
                "[x, y, width, height] in pixels or fractions of the image"
            )
        if len(self.boxes) > limits.MAX_BOXES:
            raise RequestError(f"{len(self.boxes)} boxes given; at most {limits.MAX_BOXES}")
        if self.strength is not None:
            check_strength(self.strength)

    def picture(
        self, source: Image.Image, mask: Image.Image | None, multiple: int = limits.SIZE_MULTIPLE
    ) -> Image.Image:
        """The mask the model reads for `source` (decoded `mask`, or the boxes drawn at the source's original
        size), prepared to the output size. Raises RequestError for a mask of another aspect ratio, boxes outside
        the picture, and a mask that repaints nothing."""
        if mask is None:
            mask = boxes_mask(self.boxes, original_size(source))
        return fit_mask(mask, source, multiple)
