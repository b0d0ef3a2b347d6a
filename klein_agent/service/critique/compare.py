"""What changed between two pictures, as a pure function of their pixels (numpy and Pillow, no torch, no I/O).

`compare(a, b)` aligns `a` to `b` the way an edit maps its input to its output, measures the colour difference
per pixel (CIE76 ΔE*ab in CIELAB, D65 white, from sRGB), averages it over the model's 16-px tokens, and reports
the changed tokens as 4-connected regions whose boxes lie on the token grid (so they go straight into `inpaint`),
the changed area, the mean ΔE, a global SSIM (grey, 7x7 box window), an overlay picture and a one-line verdict.
Deterministic: the same two pictures give the same numbers and the same overlay bytes.

Why these measures: ΔE sees a hue or lighting change that grey SSIM misses; SSIM sees a texture change at the
same colour (smoothing, a different face) that ΔE averages away. Boxes are reported per token because a box that
is not on the grid would be rounded by the next inpaint anyway.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, features

from klein_agent.rules import limits
from klein_agent.rules.masks import Box, box_rectangle
from klein_agent.rules.resolution import RequestError, prepared_reference_size

TOKEN = limits.SIZE_MULTIPLE
DELTA_E = "CIE76 ΔE*ab (CIELAB, D65)"

# sRGB (IEC 61966-2-1) 8-bit value -> linear light, one table lookup per channel.
_V = np.arange(256, dtype=np.float64) / 255.0
_LINEAR = np.where(_V <= 0.04045, _V / 12.92, ((_V + 0.055) / 1.055) ** 2.4).astype(np.float32)
# Linear sRGB -> XYZ (D65), each row divided by the D65 white point, so white maps to (1, 1, 1).
_TO_XYZ = (
    np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    / np.array([[0.95047], [1.0], [1.08883]])
).astype(np.float32)
_EPSILON = (6 / 29) ** 3  # CIELAB's f(t): cube root above, linear below (continuous at this point)
# SSIM's constants for 8-bit values (Wang et al. 2004: K1 = 0.01, K2 = 0.03, L = 255) and its window.
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
SSIM_WINDOW = 7


@dataclass(frozen=True)
class Region:
    """One changed region: its box [x, y, width, height] in px of `b` (on the 16-px grid, clipped to the picture)
    and in fractions of b's width and height, its changed area in % of the picture, and its mean ΔE."""

    box_px: tuple[int, int, int, int]
    box_frac: tuple[float, float, float, float]
    area_pct: float
    mean_delta_e: float


@dataclass(frozen=True)
class Comparison:
    """The result of `compare`. Sizes are (width, height) in px; percentages are of b's area."""

    a_size: tuple[int, int]
    b_size: tuple[int, int]
    alignment: str  # how a was mapped onto b, in words
    changed_pct: float
    ssim: float  # mean SSIM over the picture, 1.0 for identical pictures
    mean_delta_e: float  # over the whole picture
    regions: tuple[Region, ...]  # the largest CHANGE_MAX_REGIONS, largest first
    region_count: int  # all regions, including those not listed
    expected_box: (
        tuple[int, int, int, int] | None
    )  # the caller's box in px of b (x, y, w, h), if one was given
    outside_pct: float | None  # changed area outside that box, % of the picture
    verdict: str
    overlay: bytes  # WebP (JPEG where Pillow lacks WebP), at most OVERLAY_MAX_BYTES
    overlay_mime_type: str
    overlay_size: tuple[int, int]


def compare(
    a: Image.Image, b: Image.Image, *, expected: Box | None = None, names: tuple[str, str] = ("a", "b")
) -> Comparison:
    """What changed from `a` (before) to `b` (after), in b's pixels; `expected` is the box the caller meant to
    change (px of b, or fractions), for the verdict. `names` label the pictures in messages (their ids).

    Raises RequestError when a picture is smaller than one token (16 px a side), when their aspect ratios differ
    by more than `CHANGE_MAX_ASPECT_DIFFERENCE` (no edit maps one onto the other), or for an `expected` box that
    is not a region inside b (`masks.box_rectangle`'s messages). Memory: a few float32 copies of the pictures at
    most `CHANGE_WORK_EDGE` px, whatever their size."""
    for name, picture in zip(names, (a, b), strict=True):
        if min(picture.size) < TOKEN:
            raise RequestError(
                f"{name} is {picture.width}x{picture.height}: compare_images needs pictures at least {TOKEN} px a "
                f"side (one token); view_image shows a smaller one"
            )
    expected_px = None
    if expected is not None:
        left, top, right, bottom = box_rectangle(expected, b.size, name="expected_box")
        expected_px = (left, top, right - left, bottom - top)
    aligned, alignment = align(a, b, names)
    width, height = b.size
    cols, rows = math.ceil(width / TOKEN), math.ceil(height / TOKEN)
    k = _work_token(cols, rows)  # work pixels per token side
    work = (cols * k, rows * k)
    rgb_a = np.asarray(_resized(aligned, work, TOKEN // k), dtype=np.uint8)
    rgb_b = np.asarray(_resized(b.convert("RGB"), work, TOKEN // k), dtype=np.uint8)

    lab_a, lab_b = _lab(rgb_a), _lab(rgb_b)
    delta = np.sqrt(sum((lab_a[i] - lab_b[i]) ** 2 for i in range(3)))  # [rows*k, cols*k], ΔE per pixel
    per_token = _block_means(delta, k)  # [rows, cols]
    # A token counts when its mean ΔE is over the threshold, or when enough of it changed clearly (over twice the
    # threshold, far above any noise): a change that covers 3 of a token's 16 columns averages under the
    # threshold, and its box must still hold it, or an inpaint of the box would leave a seam.
    strong = _block_means((delta > 2 * limits.CHANGE_DELTA_E).astype(np.float32), k)
    changed = (per_token > limits.CHANGE_DELTA_E) | (strong >= limits.CHANGE_MIN_COVER)
    token_area = _token_areas(
        width, height, cols, rows
    )  # px of b each token covers (edge tokens are partial)
    total = float(width * height)
    changed_pct = 100.0 * float(token_area[changed].sum()) / total
    grey_b = _grey(rgb_b)
    similarity = ssim(_ssim_scale(_grey(rgb_a), b.size), _ssim_scale(grey_b, b.size))
    regions = _regions(changed, per_token, token_area, (width, height))
    outside_pct = None
    if expected_px is not None:
        inside = _inside(expected_px, cols, rows)
        outside_pct = 100.0 * float(token_area[changed & ~inside].sum()) / total
    comparison = Comparison(
        a_size=a.size,
        b_size=b.size,
        alignment=alignment,
        changed_pct=round(changed_pct, 2),
        ssim=round(similarity, 4),
        mean_delta_e=round(float(delta.mean()), 2),
        regions=tuple(regions[: limits.CHANGE_MAX_REGIONS]),
        region_count=len(regions),
        expected_box=expected_px,
        outside_pct=None if outside_pct is None else round(outside_pct, 2),
        verdict="",
        overlay=b"",
        overlay_mime_type="",
        overlay_size=work,
    )
    data, mime = _overlay(grey_b, per_token, changed, comparison, b.size)
    return replace(comparison, verdict=verdict_line(comparison), overlay=data, overlay_mime_type=mime)


def align(a: Image.Image, b: Image.Image, names: tuple[str, str] = ("a", "b")) -> tuple[Image.Image, str]:
    """`a` as an RGB picture of b's size, and how it got there, in words. An edit scales its input down to about
    1 Mpx (Lanczos) and center-crops it to whole tokens, and its output has that size (`rules.references`); so
    `a` is prepared that way first, and resized (bilinear) only when that still does not give b's size (an edit
    given its own width and height). Raises RequestError when the aspect ratios differ by more than 2%."""
    a = a.convert("RGB")
    if a.size == b.size:
        return a, "same size"
    prepared = _as_edit_input(a)
    if prepared.size == b.size:
        return prepared, (
            f"{names[0]} prepared as an edit prepares its input ({a.width}x{a.height} -> {b.width}x{b.height})"
        )
    for candidate, how in ((prepared, "prepared as an edit's input, then resized"), (a, "resized")):
        if min(candidate.size) > 0 and _same_aspect(candidate.size, b.size):
            resized = candidate.resize(b.size, Image.Resampling.BILINEAR)
            return resized, f"{names[0]} {how} ({a.width}x{a.height} -> {b.width}x{b.height})"
    raise RequestError(
        f"{names[0]} is {a.width}x{a.height} and {names[1]} is {b.width}x{b.height}: their aspect ratios differ by "
        f"more than {limits.CHANGE_MAX_ASPECT_DIFFERENCE:.0%}, so neither is an edit of the other; compare "
        "an image with its edit (its parent in list_images), or view both with view_image"
    )


def verdict_line(c: Comparison) -> str:
    """One sentence an agent can act on, from the numbers of `c` (its `verdict` field is ignored)."""
    pct, where = _pct(c.changed_pct), f"SSIM {c.ssim:.3f}, mean ΔE {c.mean_delta_e:.1f}"
    if not c.regions:
        return (
            f"No change: no {TOKEN}-px token differs by more than ΔE {limits.CHANGE_DELTA_E:g} ({where}); if you "
            "asked for an edit, it did not take: rephrase the prompt, or inpaint the region."
        )
    largest = list(c.regions[0].box_px)
    if c.expected_box is not None and c.outside_pct is not None:
        if c.outside_pct <= limits.CHANGE_OUTSIDE_TOLERANCE_PCT:
            return f"{pct} changed, inside the box you asked for ({where})."
        inside = c.changed_pct - c.outside_pct
        return (
            f"{pct} changed, {_pct(c.outside_pct)} of the picture outside the box you asked for"
            + (" and nothing inside it" if inside <= 0 else "")
            + f" ({where}): the edit leaked; inpaint the regions outside the box with the original, or retry."
        )
    if c.changed_pct >= limits.CHANGE_WHOLE_PCT and c.ssim < limits.CHANGE_UNRELATED_SSIM:
        return (
            f"{pct} changed and the structure differs too ({where}): b shares almost nothing with a; the edit "
            "ignored its input, or these are two different pictures."
        )
    if c.changed_pct >= limits.CHANGE_WHOLE_PCT:
        return (
            f"{pct} changed: the edit touched the whole picture ({where}); for a local change, inpaint the region "
            "instead of editing."
        )
    return f"{pct} changed in {c.region_count} region(s); largest {largest} px of b ({where})."


# ---- internals ------------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{value:.1f} %" if value < 10 else f"{value:.0f} %"


def _as_edit_input(image: Image.Image) -> Image.Image:
    """`rules.references.prepare_reference` without its geometry checks (which speak of references): scaled down
    (Lanczos) to at most REFERENCE_MAX_AREA, then center-cropped to whole tokens."""
    w, h = image.size
    if w * h > limits.REFERENCE_MAX_AREA:
        image = image.resize(prepared_reference_size(w, h, 1), Image.Resampling.LANCZOS)
        w, h = image.size
    cw, ch = prepared_reference_size(w, h, TOKEN)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1]))) <= math.log1p(limits.CHANGE_MAX_ASPECT_DIFFERENCE)


def _work_token(cols: int, rows: int) -> int:
    """Work pixels per token side: the largest power of two up to 16 that keeps the long edge within
    CHANGE_WORK_EDGE (at least 1), so a picture of whole tokens shrinks by a whole factor (`Image.reduce`)."""
    k = TOKEN
    while k > 1 and max(cols, rows) * k > limits.CHANGE_WORK_EDGE:
        k //= 2
    return k


def _resized(image: Image.Image, size: tuple[int, int], factor: int) -> Image.Image:
    """`image` at `size`: as it is, averaged over factor x factor blocks when that gives `size` exactly (the
    usual case: sides of whole tokens; the fastest area average Pillow has), else resized (bilinear)."""
    if image.size == size:
        return image
    whole = not (image.width % factor or image.height % factor)
    if factor > 1 and whole and (image.width // factor, image.height // factor) == size:
        return image.reduce(factor)
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _lab(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[H, W, 3] uint8 sRGB -> CIELAB (D65) as three [H, W] float32 planes L*, a*, b*. Written per channel:
    numpy's matmul over a last axis of 3 is several times slower than these nine multiply-adds."""
    lin = _LINEAR[rgb]
    r, g, b = lin[..., 0], lin[..., 1], lin[..., 2]
    f = []
    for row in _TO_XYZ:
        t = row[0] * r + row[1] * g + row[2] * b
        f.append(
            np.where(t > _EPSILON, np.cbrt(t), t * np.float32(1 / (3 * (6 / 29) ** 2)) + np.float32(4 / 29))
        )
    fx, fy, fz = f
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def _block_means(x: np.ndarray, n: int) -> np.ndarray:
    """[H, W] -> [H / n, W / n]: the mean of each n x n block (H and W multiples of n). Summed one axis at a
    time: numpy reduces a reshaped array over two inner axes far more slowly."""
    h, w = x.shape
    if n == 1:
        return x
    rows = x.reshape(h // n, n, w).sum(axis=1)
    return rows.reshape(h // n, w // n, n).sum(axis=2) / (n * n)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as Pillow's "L" conversion weighs it, in float64 for the SSIM sums."""
    channels = rgb.astype(np.float64, copy=False)
    return 0.299 * channels[..., 0] + 0.587 * channels[..., 1] + 0.114 * channels[..., 2]


def _ssim_scale(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A grey work picture at the scale SSIM is meant to be read at: Wang et al.'s reference implementation
    (ssim_index.m) first averages the picture over f x f blocks, f = max(1, round(short side / 256)), so that a
    7x7 window covers what the eye resolves at a normal viewing distance. f is taken from b's size (not the work
    picture's), so the measure does not depend on CHANGE_WORK_EDGE; the remaining factor is applied here."""
    f = max(1, round(min(size) / 256))
    step = max(1, round(f * grey.shape[0] / size[1]))  # the work picture is already size / shape smaller
    h, w = grey.shape[0] // step * step, grey.shape[1] // step * step
    return _block_means(grey[:h, :w], step)


def _box_means(x: np.ndarray, n: int) -> np.ndarray:
    """Means over every n x n window that fits ("valid"), from an integral image."""
    s = np.zeros((x.shape[0] + 1, x.shape[1] + 1))
    s[1:, 1:] = x.cumsum(0).cumsum(1)
    return (s[n:, n:] - s[:-n, n:] - s[n:, :-n] + s[:-n, :-n]) / (n * n)


def ssim(x: np.ndarray, y: np.ndarray, window: int = SSIM_WINDOW) -> float:
    """Mean SSIM (Wang et al. 2004) of two same-shape grey pictures (values 0-255) over every `window`-square
    box window that fits, with sample covariances (N-1), as scikit-image's `structural_similarity` defaults.
    A picture smaller than the window is compared as one window."""
    n = min(window, *x.shape)
    mx, my = _box_means(x, n), _box_means(y, n)
    cov = n * n / (n * n - 1) if n > 1 else 1.0
    vx = (_box_means(x * x, n) - mx * mx) * cov
    vy = (_box_means(y * y, n) - my * my) * cov
    vxy = (_box_means(x * y, n) - mx * my) * cov
    s = ((2 * mx * my + _C1) * (2 * vxy + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2))
    return float(s.mean())


def _token_areas(width: int, height: int, cols: int, rows: int) -> np.ndarray:
    """[rows, cols]: the px of a width x height picture each 16-px token covers (the last row and column may be
    partial)."""
    xs = np.minimum(TOKEN, width - TOKEN * np.arange(cols))
    ys = np.minimum(TOKEN, height - TOKEN * np.arange(rows))
    return np.outer(ys, xs).astype(np.float64)


def _inside(box: tuple[int, int, int, int], cols: int, rows: int) -> np.ndarray:
    """[rows, cols]: the tokens whose centre lies inside `box` (x, y, w, h in px)."""
    x, y, w, h = box
    cx = TOKEN * np.arange(cols) + TOKEN / 2
    cy = TOKEN * np.arange(rows) + TOKEN / 2
    return np.outer((cy >= y) & (cy < y + h), (cx >= x) & (cx < x + w))


def _regions(
    changed: np.ndarray, per_token: np.ndarray, token_area: np.ndarray, size: tuple[int, int]
) -> list[Region]:
    """The 4-connected groups of changed tokens as Regions, largest area first (ties: top, then left, first).

    Labels runs of changed tokens per row and joins the runs that overlap in the next row (union-find), so the
    work grows with the runs, not the tokens: a picture changed everywhere is one run per row."""
    width, height = size
    weighted = per_token * token_area
    area_sums = np.concatenate([np.zeros((changed.shape[0], 1)), token_area.cumsum(1)], axis=1)
    de_sums = np.concatenate([np.zeros((changed.shape[0], 1)), weighted.cumsum(1)], axis=1)
    padded = np.zeros((changed.shape[0], changed.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = changed
    edges = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past where it ends
    runs: list[tuple[int, int, int]] = []  # (row, first column, one past the last)
    row_runs: list[list[int]] = []
    for r in range(changed.shape[0]):
        starts, stops = np.flatnonzero(edges[r] == 1), np.flatnonzero(edges[r] == -1)
        row_runs.append(list(range(len(runs), len(runs) + len(starts))))
        runs.extend((r, int(c0), int(c1)) for c0, c1 in zip(starts, stops, strict=True))
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(1, changed.shape[0]):
        above, here = row_runs[r - 1], row_runs[r]
        i = j = 0
        while i < len(above) and j < len(here):
            _, a0, a1 = runs[above[i]]
            _, b0, b1 = runs[here[j]]
            if a0 < b1 and b0 < a1:  # they share a column: 4-connected
                parent[root(here[j])] = root(above[i])
            if a1 < b1:
                i += 1
            else:
                j += 1
    groups: dict[int, list[float]] = {}  # root -> [area, ΔE x area, min col, min row, max col, max row]
    for i, (r, c0, c1) in enumerate(runs):
        g = groups.setdefault(root(i), [0.0, 0.0, c0, r, c1, r])
        g[0] += area_sums[r, c1] - area_sums[r, c0]
        g[1] += de_sums[r, c1] - de_sums[r, c0]
        g[2], g[3], g[4], g[5] = min(g[2], c0), min(g[3], r), max(g[4], c1), max(g[5], r)
    found: list[tuple[float, int, int, Region]] = []
    for area, de, first_col, first_row, end_col, last_row in groups.values():
        x, y = int(first_col) * TOKEN, int(first_row) * TOKEN
        w, h = min(width, int(end_col) * TOKEN) - x, min(height, (int(last_row) + 1) * TOKEN) - y
        region = Region(
            box_px=(x, y, w, h),
            box_frac=(round(x / width, 4), round(y / height, 4), round(w / width, 4), round(h / height, 4)),
            area_pct=round(float(100.0 * area / (width * height)), 2),
            mean_delta_e=round(float(de / area), 2),
        )
        found.append((-area, y, x, region))
    found.sort(key=lambda item: item[:3])
    return [item[3] for item in found]


def _overlay(
    grey_b: np.ndarray, per_token: np.ndarray, changed: np.ndarray, c: Comparison, size: tuple[int, int]
) -> tuple[bytes, str]:
    """b in dimmed grey, changed tokens tinted red by their ΔE, region boxes in yellow, the caller's box in cyan;
    encoded as WebP (else JPEG) within OVERLAY_MAX_BYTES."""
    work = (grey_b.shape[1], grey_b.shape[0])
    base = Image.fromarray((grey_b * 0.6).astype(np.uint8), "L").convert("RGB")
    # Tint: none on unchanged tokens; on changed ones from a third (the threshold) up to 70 % red at three times it.
    strength = np.clip(per_token / (3 * limits.CHANGE_DELTA_E), 1 / 3, 1) * changed
    mask = Image.fromarray((strength * 0.7 * 255).astype(np.uint8), "L").resize(
        work, Image.Resampling.NEAREST
    )
    picture = Image.composite(Image.new("RGB", work, (255, 40, 40)), base, mask)
    draw = ImageDraw.Draw(picture)
    scale_x, scale_y = picture.width / size[0], picture.height / size[1]
    boxes = [(r.box_px, (255, 220, 0)) for r in c.regions]
    if c.expected_box is not None:
        boxes.append((c.expected_box, (0, 220, 255)))
    for (x, y, w, h), colour in boxes:
        draw.rectangle(
            (x * scale_x, y * scale_y, (x + w) * scale_x - 1, (y + h) * scale_y - 1), outline=colour, width=2
        )
    webp = features.check("webp")
    while True:  # quality first, then size: a 512 px overlay is ~20 KB at the first quality
        for quality in (80, 60, 40, 20):
            out = io.BytesIO()
            if webp:
                picture.save(out, "WEBP", quality=quality, method=0)
            else:
                picture.save(out, "JPEG", quality=quality)
            if out.tell() <= limits.OVERLAY_MAX_BYTES:
                return out.getvalue(), "image/webp" if webp else "image/jpeg"
        picture = picture.resize((max(1, picture.width // 2), max(1, picture.height // 2)))
