"""klein_agent.service.previews: inline previews within the tool-result budget, and clean store PNGs."""

from __future__ import annotations

import base64
import io
import math
import random
from typing import Any, cast

import pytest
from PIL import Image, ImageDraw, ImageFont

from klein_agent.service import previews
from klein_agent.service.previews import Preview, make_preview


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    # Uniform noise is the worst case for every codec: it barely compresses.
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def gradient(size: tuple[int, int]) -> Image.Image:
    return Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize(size),
            Image.linear_gradient("L").rotate(90).resize(size),
            Image.new("L", size, 128),
        ),
    )


def reopen(p: Preview) -> Image.Image:
    img = Image.open(io.BytesIO(p.data))
    img.load()
    return img


def check(p: Preview, *, budget: int = 700_000, max_edge: int = 1024) -> Image.Image:
    assert len(base64.b64encode(p.data)) <= budget
    img = reopen(p)
    assert {"image/webp": "WEBP", "image/jpeg": "JPEG"}[p.mime_type] == img.format  # MIME matches the bytes
    assert img.size == (p.width, p.height)
    assert max(img.size) <= max_edge
    return img


# ------------------------------------------------------------------------------------------------ previews


def test_single_image_scaled_to_max_edge() -> None:
    p = make_preview([gradient((2048, 1024))], ["1 img_x seed 1"])
    assert p.mime_type == "image/webp"
    assert (p.width, p.height) == (1024, 512)
    check(p)


def test_single_image_never_upscaled() -> None:
    p = make_preview([gradient((300, 200))], ["x"])
    assert (p.width, p.height) == (300, 200)


def test_single_rgba_and_palette_inputs() -> None:
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    img = check(make_preview([rgba], ["x"]))
    px = img.convert("RGB").getpixel((50, 50))
    assert isinstance(px, tuple) and min(px) > 240  # transparency shown on white
    check(make_preview([gradient((128, 128)).convert("P")], ["x"]))


def test_noisy_2048_respects_default_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[tuple[int, int]] = []
    real_encode = previews._encode

    def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
        encoded.append(img.size)
        return real_encode(img, fmt, quality)

    monkeypatch.setattr(previews, "_encode", encode)
    p = make_preview([noise((2048, 2048))], ["x"])
    check(p)
    edge = max(p.width, p.height)
    assert edge >= 512  # budget met mostly by quality, not by shrinking to a thumbnail
    # The work, counted rather than timed: each encode is of at most the 1024 px edge, each size is tried with
    # at most the quality ladder plus the jump to its lowest step, and each new size is >= 15% smaller, so
    # reaching `edge` from 1024 takes at most 1 + log(1024 / edge) / log(1 / 0.85) sizes.
    assert max(max(size) for size in encoded) <= 1024
    sizes = 1 + math.floor(math.log(1024 / edge) / math.log(1 / 0.85))
    assert len(encoded) <= sizes * (len(previews._QUALITIES) + 1)


@pytest.mark.parametrize("budget", [200_000, 50_000, 10_000])
def test_tight_budgets_shrink_until_they_fit(budget: int) -> None:
    p = make_preview([noise((1024, 1024), seed=1)], ["x"], budget_b64=budget)
    check(p, budget=budget)
    p4 = make_preview(
        [noise((512, 512), seed=s) for s in range(4)], [f"{s}" for s in range(4)], budget_b64=budget
    )
    check(p4, budget=budget)


def test_nine_images_tiny_budget_still_within_edge() -> None:
    imgs = [noise((256, 256), seed=s) for s in range(9)]
    p = make_preview(imgs, [str(i) for i in range(9)], max_edge=256, budget_b64=4_000)
    check(p, budget=4_000, max_edge=256)


def test_max_edge_respected() -> None:
    p = make_preview([gradient((1600, 900))], ["x"], max_edge=512)
    assert (p.width, p.height) == (512, 288)
    p4 = make_preview([gradient((1024, 1024))] * 4, ["a", "b", "c", "d"], max_edge=512)
    check(p4, max_edge=512)


def _label_strip_has_text(img: Image.Image, box: tuple[int, int, int, int]) -> bool:
    strip = img.convert("L").crop(box)
    lo, hi = cast("tuple[int, int]", strip.getextrema())  # one band: (min, max)
    return lo < 80 and hi > 180  # dark strip with light glyphs on it


def test_four_images_make_a_labelled_2x2_sheet() -> None:
    colors = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]
    imgs = [Image.new("RGB", (1024, 1024), c) for c in colors]
    labels = [f"{i + 1} img_ab12… seed {7 + i}" for i in range(4)]
    p = make_preview(imgs, labels)
    sheet = check(p).convert("RGB")
    w, h = sheet.size
    assert max(w, h) <= 1024 and min(w, h) > 900  # two cells each way, near the full edge
    # each quadrant shows its own image, in reading order
    for (cx, cy), c in zip(
        [(w // 4, h // 4), (3 * w // 4, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)],
        colors,
        strict=True,
    ):
        px = sheet.getpixel((cx, cy))
        assert isinstance(px, tuple)
        assert all(abs(a - b) < 30 for a, b in zip(px, c, strict=True)), (px, c)
    # under each image, a label strip with text in it
    label_px = previews._font_px(1024) + 8
    for r in range(2):
        bottom = (r + 1) * (h // 2)
        for col in range(2):
            assert _label_strip_has_text(
                sheet, (col * w // 2 + 8, bottom - label_px, col * w // 2 + 200, bottom - 4)
            )


def test_two_images_side_by_side() -> None:
    p = make_preview([gradient((512, 512)), noise((512, 512))], ["1 a", "2 b"])
    check(p)
    assert p.width > p.height  # 1 row x 2 columns


@pytest.mark.parametrize(
    ("n", "grid"), [(1, (1, 1)), (2, (2, 1)), (3, (2, 2)), (4, (2, 2)), (5, (3, 2)), (9, (3, 3))]
)
def test_grid_shapes(n: int, grid: tuple[int, int]) -> None:
    assert previews._grid(n) == grid


def test_sheet_of_small_images_is_not_upscaled_but_labels_fit() -> None:
    p = make_preview([gradient((64, 64))] * 4, ["1 img_ab12… seed 7"] * 4)
    sheet = check(p)
    assert max(sheet.size) < 400  # native-size cells, padded for the label, not blown up to 1024
    assert sheet.width >= 2 * previews._MIN_CELL_W


def test_mixed_sizes_and_long_labels() -> None:
    imgs = [gradient((1024, 512)), gradient((512, 1024)), noise((300, 300))]
    p = make_preview(imgs, ["x" * 500, "line\nbreak\ttab", ""])
    check(p)


def test_bitmap_font_fallback_handles_any_label(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow without FreeType only has a Latin-1 bitmap font; labels with "…" or CJK must not crash.
    monkeypatch.setattr(previews, "_font", lambda px: ImageFont.load_default_imagefont())
    check(make_preview([gradient((256, 256))] * 2, ["1 img_ab12… seed 7", "2 漢字 " * 40]))


def test_jpeg_fallback_when_webp_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(previews, "_has_webp", lambda: False)
    p = make_preview([noise((2048, 2048))], ["x"])
    assert p.mime_type == "image/jpeg"
    check(p)
    p4 = make_preview([gradient((512, 512))] * 4, list("abcd"))
    assert p4.mime_type == "image/jpeg"
    check(p4)


def test_preview_argument_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        make_preview([], [])
    with pytest.raises(ValueError, match="labels"):
        make_preview([gradient((64, 64))], ["a", "b"])
    with pytest.raises(ValueError, match="too small"):
        make_preview([noise((512, 512))], ["x"], budget_b64=100)
    with pytest.raises(ValueError, match="max_edge"):
        make_preview([gradient((64, 64))], ["x"], max_edge=8)


# ----------------------------------------------------------------------------------------------- store PNG


@pytest.mark.parametrize(("tile", "max_edge"), [(256, 1024), (256, 600), (256, 400), (128, 300), (64, 256)])
def test_a_sheet_label_never_loses_its_seed(
    monkeypatch: pytest.MonkeyPatch, tile: int, max_edge: int
) -> None:
    """Labels as the studio writes them (a 22-character id, a ten-digit seed) on 256 px tiles and smaller: the
    id is shortened, or the font shrinks, but each drawn label ends with its whole seed and fits its cell."""
    drawn: list[tuple[str, float]] = []
    draw_text = ImageDraw.ImageDraw.text

    def record(self: ImageDraw.ImageDraw, xy: Any, text: Any, *args: Any, **kwargs: Any) -> None:
        drawn.append((text, self.textlength(text, font=kwargs["font"])))
        draw_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    seeds = [4294967292 + k for k in range(4)]
    labels = [f"{k} img_{'Q' * 22} seed {s}" for k, s in enumerate(seeds, 1)]
    check(make_preview([gradient((tile, tile))] * 4, labels, max_edge=max_edge))
    assert [text.split(" ")[0] for text, _ in drawn] == ["1", "2", "3", "4"]
    assert [text.endswith(f" seed {s}") for (text, _), s in zip(drawn, seeds, strict=True)] == [True] * 4
    cell = (max_edge - 3 * previews._GAP) // 2  # the widest a cell of a 2x2 sheet within max_edge can be
    assert all(width <= cell - 8 for _, width in drawn), drawn
