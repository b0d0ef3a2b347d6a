"""What a model sees inline in a tool result: one budgeted preview, or one labelled contact sheet for several.

Previews are budgeted by their *base64* length, what travels in the JSON-RPC message: Claude Desktop refuses tool
results over 1 MB, so all inline images of one result get at most ~700,000 characters (docs/server.md, "What an
image tool returns"). Several images become one labelled contact sheet rather than N images. No torch, no MCP.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont, features

from klein_agent.service.pixels import to_rgb

# WebP "method" trades encoder effort for size; at preview sizes 1 costs ~30 ms for 1024 px where the default (4)
# costs ~90-120 ms, for files within a few percent of each other, and the budget loop below still applies.
_WEBP_METHOD = 1
_QUALITIES = (85, 75, 62, 50, 38)  # step down quality first: at preview sizes it costs less than resolution
_MIN_EDGE = 32  # below this a preview is useless; a budget that cannot fit it is a caller bug
_SHEET_BG = (128, 128, 128)  # neutral grey: neither light nor dark images blend into it
_LABEL_BG = (24, 24, 24)
_LABEL_FG = (245, 245, 245)
_GAP = 4
_MIN_CELL_W = 160  # small images get padded cells so a label like "1 img_ab12… seed 7" stays readable
_MIN_LABEL_PX = 8  # a label's font shrinks to this before its seed would be cut


@dataclass(frozen=True)
class Preview:
    """One encoded preview picture and its size in px."""

    data: bytes  # raw encoded bytes; the caller base64-encodes them for ImageContent
    mime_type: str  # "image/webp" or "image/jpeg", always matching `data`
    width: int
    height: int


def make_preview(
    images: Sequence[Image.Image],
    labels: Sequence[str],
    *,
    max_edge: int = 1024,
    budget_b64: int = 700_000,
) -> Preview:
    """One image: it, scaled so its long edge is <= max_edge (never upscaled). Several: one labelled grid.

    Encodes WebP (JPEG when this Pillow lacks WebP), lowering quality and then size until the base64 form is
    at most `budget_b64` characters. Raises ValueError for an empty list, mismatched labels, or a budget too
    small for even a tiny preview.
    """
    if not images:
        raise ValueError("make_preview needs at least one image")
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if max_edge < _MIN_EDGE:
        raise ValueError(f"max_edge must be at least {_MIN_EDGE}")
    flat = [to_rgb(im) for im in images]
    natural = max(flat[0].size) if len(flat) == 1 else _natural_sheet_edge(flat)
    edge = min(max_edge, natural)
    fmt, mime = ("WEBP", "image/webp") if _has_webp() else ("JPEG", "image/jpeg")

    while True:
        canvas = _scaled(flat[0], edge) if len(flat) == 1 else _contact_sheet(flat, list(labels), edge)
        data = b""
        for i, q in enumerate(_QUALITIES):
            data = _encode(canvas, fmt, q)
            over = _b64_len(len(data)) / budget_b64
            if over <= 1:
                return Preview(data=data, mime_type=mime, width=canvas.width, height=canvas.height)
            if over > 2.5 and i < len(_QUALITIES) - 1:
                # Far over budget (noise, fine texture): the middle qualities cannot close the gap, so go
                # straight to the lowest one before shrinking. Saves several encodes per round.
                data = _encode(canvas, fmt, _QUALITIES[-1])
                if _b64_len(len(data)) <= budget_b64:
                    return Preview(data=data, mime_type=mime, width=canvas.width, height=canvas.height)
                break
        # Encoded size scales roughly with area, so shrink the edge by the square root of the overshoot
        # (with a margin), and by at least 15% so the loop always makes progress.
        ratio = math.sqrt(budget_b64 / _b64_len(len(data))) * 0.95
        new_edge = int(max(canvas.width, canvas.height) * min(0.85, ratio))
        if new_edge < _MIN_EDGE:
            raise ValueError(f"budget_b64={budget_b64} is too small for a {_MIN_EDGE} px preview")
        edge = new_edge


def _b64_len(n: int) -> int:
    return 4 * math.ceil(n / 3)


@lru_cache(maxsize=1)
def _has_webp() -> bool:
    return bool(features.check("webp"))


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "WEBP":
        img.save(buf, format="WEBP", quality=quality, method=_WEBP_METHOD)
    else:
        img.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled down (never up) to fit in `box`, aspect kept, each side >= 1."""
    w, h = size
    s = min(1.0, box[0] / w, box[1] / h)
    return max(1, round(w * s)), max(1, round(h * s))


def _scaled(img: Image.Image, edge: int) -> Image.Image:
    target = _fit(img.size, (edge, edge))
    if target == img.size:
        return img
    # reducing_gap: a fast integer reduction first, then Lanczos; visually identical at preview sizes.
    return img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))  # 2 -> 2x1, 3-4 -> 2x2, 5-6 -> 3x2, 7-9 -> 3x3
    return cols, math.ceil(n / cols)


def _font_px(edge: int) -> int:
    return max(13, min(20, edge // 52))


@lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if features.check("freetype2"):
        return ImageFont.load_default(size=px)
    return ImageFont.load_default()  # bitmap fallback: fixed size, still legible


def _label_h(px: int) -> int:
    return px + 8


def _natural_sheet_edge(images: Sequence[Image.Image]) -> int:
    """Long edge of the sheet with every cell at the largest image's native size (the no-upscale bound)."""
    cols, rows = _grid(len(images))
    cw = max(max(im.width for im in images), _MIN_CELL_W)
    ch = max(im.height for im in images)
    px = _font_px(2048)
    return max(cols * cw + (cols + 1) * _GAP, rows * (ch + _label_h(px)) + (rows + 1) * _GAP)


def _contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], edge: int) -> Image.Image:
    cols, rows = _grid(len(images))
    px = _font_px(edge)
    label_h = _label_h(px)
    # Cells share one size: the largest image's, scaled so the whole sheet's long edge is <= edge. Label
    # strips and gaps keep a fixed pixel height so text stays readable however small the cells get.
    max_w = max(im.width for im in images)
    max_h = max(im.height for im in images)
    avail_w = edge - (cols + 1) * _GAP
    avail_h = edge - (rows + 1) * _GAP - rows * label_h
    if avail_w < cols or avail_h < rows:
        avail_w, avail_h = max(avail_w, cols), max(avail_h, rows)
    s = min(1.0, avail_w / (cols * max_w), avail_h / (rows * max_h))
    cell_w = max(1, int(max_w * s))
    cell_h = max(1, int(max_h * s))
    cell_w = max(cell_w, min(_MIN_CELL_W, avail_w // cols))  # pad narrow cells for the label, no upscaling
    width = cols * cell_w + (cols + 1) * _GAP
    height = rows * (cell_h + label_h) + (rows + 1) * _GAP
    sheet = Image.new("RGB", (width, height), _SHEET_BG)
    draw = ImageDraw.Draw(sheet)
    for k, (im, label) in enumerate(zip(images, labels, strict=True)):
        r, c = divmod(k, cols)
        x0 = _GAP + c * (cell_w + _GAP)
        y0 = _GAP + r * (cell_h + label_h + _GAP)
        size = _fit(im.size, (cell_w, cell_h))
        thumb = im if size == im.size else im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        sheet.paste(thumb, (x0 + (cell_w - thumb.width) // 2, y0 + (cell_h - thumb.height) // 2))
        ly = y0 + cell_h
        draw.rectangle((x0, ly, x0 + cell_w - 1, ly + label_h - 1), fill=_LABEL_BG)
        text, fitted = _fit_label(draw, label, px, cell_w - 8)
        draw.text((x0 + 4, ly + (label_h - fitted) // 2), text, fill=_LABEL_FG, font=_font(fitted))
    if max(sheet.size) > edge:  # tiny edges: fixed-size labels and gaps alone overflow it
        sheet = _scaled(sheet, edge)
    return sheet


def _fit_label(draw: ImageDraw.ImageDraw, label: str, px: int, width: int) -> tuple[str, int]:
    """(text, font px) of `label` drawn in `width` px: a label of three words or more ("2 img_… seed 7") keeps
    its last two ("seed 7": what remakes the picture) whole and shortens the words before them; the font shrinks
    (down to _MIN_LABEL_PX) only when even "2… seed 7" does not fit. Shorter labels are cut at the end."""
    words = " ".join(label.split()).split(" ")  # no newlines or tabs in a one-line label
    head, tail = (
        (" ".join(words[:-2]), " " + " ".join(words[-2:])) if len(words) >= 3 else (" ".join(words), "")
    )
    for size in range(px, _MIN_LABEL_PX - 1, -1) if tail else (px,):
        text = _fit_text(draw, head, _font(size), width, tail)
        if text is not None:
            return text, size
    return _fit_text(draw, head + tail, _font(_MIN_LABEL_PX), width) or "", _MIN_LABEL_PX


def _fit_text(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: int,
    tail: str = "",
) -> str | None:
    """`text` + `tail` if it fits in `width` px, else the longest prefix of `text` (at least one character) with
    an ellipsis, then `tail`; None when not even that fits (with no tail: the ellipsis alone, cut)."""
    ellipsis = "…"
    if not isinstance(font, ImageFont.FreeTypeFont):
        # Pillow's bitmap fallback font encodes text as Latin-1 and raises on anything else.
        ellipsis = "..."
        text, tail = (
            t.replace("…", "...").encode("latin-1", "replace").decode("latin-1") for t in (text, tail)
        )
    if draw.textlength(text + tail, font=font) <= width:
        return text + tail
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with an ellipsis and the tail
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + ellipsis + tail, font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    if tail and lo == 0:
        return None
    return text[:lo] + ellipsis + tail
