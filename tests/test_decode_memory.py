"""Decompression bombs cost bounded memory: a decode at the input caps, measured as the peak RSS of a real process.

tracemalloc does not see Pillow's and libwebp's C buffers, so each case runs in a child process that reads its peak
resident memory (VmHWM, reset just before the decode; `ru_maxrss` where /proc has no reset). The files are written
by another child first, so neither the test process nor the measured one ever holds a full-size picture of its own.
The bounds are derived from the caps in `rules/limits.py`, not from one machine's figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from klein_agent.rules.limits import (
    FULL_DECODE_BYTES_PER_PIXEL,
    FULL_DECODE_MAX_PIXELS,
    INPUT_MAX_PIXELS,
    REFERENCE_MAX_AREA,
)
from klein_agent.service import pixels

REPO = Path(__file__).resolve().parents[1]

# Each case: a picture of the format's largest accepted square, flat colour (a few KB encoded: a bomb), with
# transparency and an EXIF rotation, so every step of the decode runs (load, transpose, alpha onto white).
MAKE = r"""
import math, sys
from PIL import ExifTags, Image
import numpy as np
from klein_agent.rules.limits import FULL_DECODE_MAX_PIXELS, INPUT_MAX_PIXELS
folder = sys.argv[1]
exif = Image.Exif()
exif[ExifTags.Base.Orientation] = 6
side = math.isqrt(FULL_DECODE_MAX_PIXELS["WEBP"])
Image.new("RGBA", (side, side), (40, 90, 200, 128)).save(
    f"{folder}/webp.webp", "WEBP", lossless=True, exif=exif.tobytes()
)
side = math.isqrt(FULL_DECODE_MAX_PIXELS["PNG"])
Image.new("RGBA", (side, side), (40, 90, 200, 128)).save(
    f"{folder}/png.png", "PNG", exif=exif.tobytes(), compress_level=1
)
side = math.isqrt(FULL_DECODE_MAX_PIXELS["WEBP"])  # the same arithmetic at half the size: half the time
Image.fromarray(np.full((side, side), 30000, np.uint16)).save(f"{folder}/png16.png", "PNG", compress_level=1)
side = math.isqrt(INPUT_MAX_PIXELS)
Image.new("RGB", (side, side), (40, 90, 200)).save(f"{folder}/jpeg.jpeg", "JPEG", exif=exif.tobytes())
"""

# Decode one file the way every input is decoded (the CLI's path reader, the server's policy defaults) and
# prepare it as a reference, reporting the peak growth of resident memory in bytes.
MEASURE = r"""
import json, resource, sys
from pathlib import Path
from PIL import Image
from klein_agent.rules.limits import INPUT_MAX_BYTES, INPUT_MAX_PIXELS
from klein_agent.rules.references import prepare_reference
from klein_agent.service.inputs import read_image_file

Image.new("RGBA", (64, 64)).resize((32, 32), Image.Resampling.LANCZOS)  # load what a first call loads

def vm(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

try:
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    start, peak = vm("VmRSS"), lambda: vm("VmHWM")
except OSError:
    unit = 1 if sys.platform == "darwin" else 1024
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
loaded = read_image_file(sys.argv[1], max_bytes=INPUT_MAX_BYTES, max_pixels=INPUT_MAX_PIXELS)
prepared = prepare_reference(loaded.image)
print(json.dumps({"growth": peak() - start, "decoded": loaded.image.size, "prepared": prepared.size}))
"""


def _run(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def cap_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("caps")
    _run(MAKE, str(folder))
    return folder


def _bound(pixels: int, bytes_per_pixel: int) -> int:
    """The most a decode of `pixels` at `bytes_per_pixel` may grow a process by, reference preparation included:
    the decode itself; Lanczos scaling's first pass (one side already scaled, the other not: 4 bytes a pixel of
    sqrt(REFERENCE_MAX_AREA x pixels) for a square) and its second pass and crop (two ~1 Mpx RGB pictures); and
    16 MiB for the interpreter and the allocator's rounding."""
    resize = 4 * math.isqrt(REFERENCE_MAX_AREA * pixels) + 2 * 4 * REFERENCE_MAX_AREA
    return bytes_per_pixel * pixels + resize + 16 * 2**20


@pytest.mark.parametrize(
    ("name", "pixels", "bytes_per_pixel"),
    [
        ("webp.webp", FULL_DECODE_MAX_PIXELS["WEBP"], FULL_DECODE_BYTES_PER_PIXEL["WEBP"]),
        ("png.png", FULL_DECODE_MAX_PIXELS["PNG"], FULL_DECODE_BYTES_PER_PIXEL["PNG"]),
        ("png16.png", FULL_DECODE_MAX_PIXELS["WEBP"], FULL_DECODE_BYTES_PER_PIXEL["PNG"]),  # 16-bit grey
        # reduced to a quarter of each side by libjpeg before it exists in memory: 1/16 of the full decode
        ("jpeg.jpeg", INPUT_MAX_PIXELS // 16, FULL_DECODE_BYTES_PER_PIXEL["JPEG"]),
    ],
)
def test_a_decode_at_the_input_caps_stays_inside_its_budget(
    cap_files: Path, name: str, pixels: int, bytes_per_pixel: int
) -> None:
    result = json.loads(_run(MEASURE, str(cap_files / name)))
    bound = _bound(pixels, bytes_per_pixel)
    print(
        f"{name}: decoded {result['decoded']}, peak growth {result['growth'] / 1e6:.0f} MB (bound {bound / 1e6:.0f})"
    )
    assert result["prepared"][0] * result["prepared"][1] <= REFERENCE_MAX_AREA
    assert result["growth"] <= bound
    assert bound <= 512 * 10**6  # the per-call goal (issue 18): every cap fits it


def test_every_full_decode_cap_fits_the_per_call_goal() -> None:
    for fmt, cap in FULL_DECODE_MAX_PIXELS.items():
        assert _bound(cap, FULL_DECODE_BYTES_PER_PIXEL[fmt]) <= 512 * 10**6, fmt


# --------------------------------------------------------------------- the strips give the whole conversion


def _random(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((h, w)).astype(np.float32), "F")
    base = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P", "I;16", "F", "CMYK", "L", "1", "RGB"])
@pytest.mark.parametrize("key", [False, True])
def test_strip_conversion_equals_the_whole_conversion(
    mode: str, key: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pixels, "STRIP_PIXELS", 70 * 64)  # 64 rows a strip: 300 rows are five, the last short
    img = _random(mode, (70, 300), seed=len(mode))
    if key:  # a tRNS colour key: one colour of the picture is transparent
        value = img.getpixel((3, 3))
        if mode in ("I;16", "P", "L", "RGB"):
            img.info["transparency"] = value
    assert img.height > 4 * pixels.STRIP_PIXELS // img.width
    strips, whole = pixels.to_rgb(img), pixels._to_rgb_whole(img)
    assert strips.mode == whole.mode == "RGB"
    assert strips.tobytes() == whole.tobytes()
