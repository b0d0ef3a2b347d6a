"""compare(a, b): the change map's boxes, areas, colour difference, SSIM, alignment, overlay and verdicts, on pictures
whose differences are known exactly. No timings here (tools/bench_critique.py has them)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from klein_agent.rules.limits import CHANGE_DELTA_E, CHANGE_MIN_COVER, OVERLAY_MAX_BYTES, SIZE_MULTIPLE
from klein_agent.rules.masks import Box
from klein_agent.rules.resolution import RequestError
from klein_agent.service.critique.compare import _lab, compare, ssim


def smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with structure at every scale (a random 32x32 field, bicubic up)."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
    return field.resize((width, height), Image.Resampling.BICUBIC)


def recoloured(
    image: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int]
) -> Image.Image:
    out = image.copy()
    x, y, w, h = box
    out.paste(colour, (x, y, x + w, y + h))
    return out


def test_identical_pictures_have_no_change_and_ssim_one() -> None:
    a = smooth(256, 192)
    c = compare(a, a.copy())
    assert (c.changed_pct, c.ssim, c.mean_delta_e, c.regions, c.region_count) == (0.0, 1.0, 0.0, (), 0)
    assert c.verdict.startswith("No change") and "did not take" in c.verdict


def test_a_token_aligned_change_is_found_exactly() -> None:
    a = smooth(512, 384)
    box = (64, 128, 48, 32)  # whole tokens
    b = recoloured(a, box, (0, 255, 0))
    c = compare(a, b)
    assert [r.box_px for r in c.regions] == [box]
    assert c.regions[0].box_frac == tuple(round(v, 4) for v in (64 / 512, 128 / 384, 48 / 512, 32 / 384))
    assert c.changed_pct == pytest.approx(100 * 48 * 32 / (512 * 384), abs=0.005)  # rounded to 2 decimals
    assert c.regions[0].area_pct == c.changed_pct
    assert "1 region(s); largest [64, 128, 48, 32] px of b" in c.verdict


def test_an_unaligned_change_is_snapped_outward_to_the_token_grid() -> None:
    a = smooth(320, 320)
    b = recoloured(a, (37, 70, 50, 41), (255, 0, 255))  # covers x 37-86, y 70-110
    c = compare(a, b)
    x, y, w, h = c.regions[0].box_px
    assert all(v % SIZE_MULTIPLE == 0 for v in (x, y, w, h))
    assert x <= 37 and y <= 70 and x + w >= 87 and y + h >= 111, "the box holds the whole change"
    # a token counts only if the change covers enough of it: never more than one token beyond the change
    assert x >= 37 - 16 and y >= 70 - 16 and x + w <= 87 + 16 and y + h <= 111 + 16


def test_regions_are_four_connected_and_sorted_by_area() -> None:
    a = smooth(256, 256)
    b = recoloured(a, (0, 0, 32, 32), (255, 255, 255))
    b = recoloured(b, (32, 32, 16, 16), (255, 255, 255))  # touches the first only at a corner: separate
    b = recoloured(b, (128, 128, 64, 64), (0, 0, 0))
    c = compare(a, b)
    assert [r.box_px for r in c.regions] == [(128, 128, 64, 64), (0, 0, 32, 32), (32, 32, 16, 16)]
    assert c.region_count == 3


def test_partial_edge_tokens_are_clipped_to_the_picture() -> None:
    a = smooth(100, 70)  # 7 x 5 tokens, the last column 4 px and the last row 6 px wide
    b = recoloured(a, (96, 64, 4, 6), (255, 255, 255))
    c = compare(a, b)
    assert [r.box_px for r in c.regions] == [(96, 64, 4, 6)]
    assert c.changed_pct == pytest.approx(100 * 24 / 7000, abs=0.005)


def test_lab_matches_the_published_values_of_srgb_primaries() -> None:
    # CIELAB (D65) of sRGB white, red and a mid grey, as tabulated (e.g. Lindbloom's calculator), to 2 decimals:
    # the tolerance is that rounding (0.005) plus float32's relative 6e-8 on values up to 100.
    pixels = np.array([[[255, 255, 255], [255, 0, 0], [128, 128, 128]]], dtype=np.uint8)
    lab = np.stack(_lab(pixels), axis=-1)[0]
    expected = [(100.0, 0.0, 0.0), (53.24, 80.09, 67.20), (53.59, 0.0, 0.0)]
    assert np.allclose(lab, expected, atol=0.005 + 100 * 6e-8 * 4)


def test_mean_delta_e_of_a_uniform_recolour_is_the_cie76_distance() -> None:
    a = Image.new("RGB", (64, 64), (255, 255, 255))
    b = Image.new("RGB", (64, 64), (255, 0, 0))
    c = compare(a, b)
    distance = math.dist((100.0, 0.0, 0.0), (53.24, 80.09, 67.20))
    assert c.mean_delta_e == pytest.approx(distance, abs=0.01 + 0.005 * math.sqrt(3))
    assert c.changed_pct == 100.0


def _ssim_by_definition(x: np.ndarray, y: np.ndarray, n: int = 7) -> float:
    """SSIM written out window by window (Wang et al. 2004, sample covariances), in float64."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - n + 1):
        for j in range(x.shape[1] - n + 1):
            wx, wy = x[i : i + n, j : j + n].ravel(), y[i : i + n, j : j + n].ravel()
            mx, my = wx.mean(), wy.mean()
            vx, vy = wx.var(ddof=1), wy.var(ddof=1)
            cov = ((wx - mx) * (wy - my)).sum() / (n * n - 1)
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_equals_the_windowed_definition() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((24, 31)) * 255
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    # Integral images subtract sums of up to 24*31*255^2 ~ 5e7 in float64 (eps 2.2e-16): errors ~1e-8 in a
    # window's variance, against c2 = 58.5 in every denominator: far below 1e-9 in the mean.
    assert ssim(x, y) == pytest.approx(_ssim_by_definition(x, y), abs=1e-9)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_an_edit_input_is_aligned_as_the_edit_prepares_it() -> None:
    big = smooth(1280, 1280)
    after = big.resize((1024, 1024), Image.Resampling.LANCZOS)  # what an edit's preparation makes of it
    after = recoloured(after, (512, 512, 64, 64), (0, 0, 255))
    c = compare(big, after)
    assert "prepared as an edit prepares its input (1280x1280 -> 1024x1024)" in c.alignment
    assert [r.box_px for r in c.regions] == [(512, 512, 64, 64)]
    cropped = smooth(520, 300)  # whole tokens: 512x288, center-cropped (4 px left, 6 px top)
    c = compare(cropped, cropped.crop((4, 6, 516, 294)))
    assert c.regions == () and "520x300 -> 512x288" in c.alignment


def test_other_aspect_ratios_and_tiny_pictures_are_refused_by_name() -> None:
    with pytest.raises(RequestError, match=r"img_a is 512x512 and img_b is 1024x768: their aspect ratios"):
        compare(smooth(512, 512), smooth(1024, 768), names=("img_a", "img_b"))
    with pytest.raises(RequestError, match=r"img_b is 1x1: compare_images needs pictures at least 16 px"):
        compare(smooth(64, 64), Image.new("RGB", (1, 1)), names=("img_a", "img_b"))


def test_expected_box_inside_and_leaking() -> None:
    a = smooth(256, 256)
    b = recoloured(a, (64, 64, 32, 32), (255, 255, 0))
    inside = compare(a, b, expected=Box(48, 48, 80, 80))
    assert inside.outside_pct == 0.0 and "inside the box you asked for" in inside.verdict
    fractions = compare(a, b, expected=Box(0.1875, 0.1875, 0.3125, 0.3125))  # the same box, in fractions
    assert fractions.expected_box == (48, 48, 80, 80) and fractions.verdict == inside.verdict
    leaked = compare(a, recoloured(b, (192, 192, 64, 64), (0, 255, 255)), expected=Box(48, 48, 80, 80))
    assert leaked.outside_pct == pytest.approx(100 * 64 * 64 / 256**2, abs=0.005)
    assert "outside the box you asked for" in leaked.verdict and "leaked" in leaked.verdict
    missed = compare(a, recoloured(a, (192, 192, 64, 64), (0, 255, 255)), expected=Box(48, 48, 80, 80))
    assert "nothing inside it" in missed.verdict
    with pytest.raises(
        RequestError, match=r"expected_box \[300, 0, 10, 10\] \(pixels\) lies outside the 256x256"
    ):
        compare(a, b, expected=Box(300, 0, 10, 10))


def test_whole_picture_and_unrelated_verdicts() -> None:
    a = smooth(256, 256)
    relit = Image.eval(a, lambda v: min(255, int(v * 0.6) + 90))  # same structure, other lighting
    c = compare(a, relit)
    assert c.changed_pct >= 50 and c.ssim >= 0.3 and "touched the whole picture" in c.verdict
    other = smooth(256, 256, seed=9)
    c = compare(a, other)
    assert c.ssim < 0.3 and "shares almost nothing" in c.verdict


def test_deterministic_and_overlay_within_its_budget() -> None:
    rng = np.random.default_rng(1)
    noise_a = Image.fromarray(rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8))
    noise_b = Image.fromarray(rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8))
    first, second = compare(noise_a, noise_b), compare(noise_a, noise_b)
    assert first == second, "same pictures, same numbers and overlay bytes"
    assert len(first.overlay) <= OVERLAY_MAX_BYTES, "white noise is the hardest picture to compress"
    with Image.open(io.BytesIO(first.overlay)) as overlay:
        assert overlay.size == first.overlay_size and max(overlay.size) <= 512


def test_the_threshold_is_the_limit() -> None:
    # Uniform greys on either side of CHANGE_DELTA_E: the first level whose ΔE from grey 128 exceeds it is found,
    # the one below is not (levels chosen from the Lab conversion, so the test follows the limit).
    grey = np.full((1, 1, 3), 128, dtype=np.uint8)
    base = np.stack(_lab(grey), axis=-1)[0, 0]
    first = next(
        v
        for v in range(129, 256)
        if np.linalg.norm(np.stack(_lab(np.full((1, 1, 3), v, np.uint8)), -1)[0, 0] - base) > CHANGE_DELTA_E
    )
    a = Image.new("RGB", (64, 64), (128, 128, 128))
    for level, found in ((first - 1, False), (first, True)):
        c = compare(a, Image.new("RGB", (64, 64), (level,) * 3))
        assert bool(c.regions) is found, (level, c.mean_delta_e)


def test_a_sliver_of_clear_change_still_marks_its_token() -> None:
    # 3 of a token's 16 columns changed by ΔE ~27: the token's mean (~5) is under CHANGE_DELTA_E, but the share of
    # clearly changed pixels (3/16) is over CHANGE_MIN_COVER, so the box holds the sliver (no seam after inpaint).
    a = Image.new("RGB", (64, 32), (128, 128, 128))
    b = a.copy()
    b.paste((200, 200, 200), (16, 0, 19, 16))
    sliver = np.stack(_lab(np.full((1, 1, 3), 200, np.uint8)), -1)[0, 0]
    grey = np.stack(_lab(np.full((1, 1, 3), 128, np.uint8)), -1)[0, 0]
    strength = float(np.linalg.norm(sliver - grey))
    assert strength * 3 / 16 < CHANGE_DELTA_E < strength / 2 and CHANGE_MIN_COVER <= 3 / 16, (
        "the case it is about"
    )
    c = compare(a, b)
    assert [r.box_px for r in c.regions] == [(16, 0, 16, 16)]
