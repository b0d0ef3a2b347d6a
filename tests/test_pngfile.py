"""The PNG format: pixels only plus one provenance chunk, deterministic bytes, every mode."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from klein_agent.service.pngfile import PROVENANCE_KEY, encode_png


def read_provenance(png: bytes) -> dict[str, Any] | None:
    """The provenance `encode_png` wrote, or None."""
    with Image.open(io.BytesIO(png), formats=["PNG"]) as img:
        text = getattr(img, "text", {}).get(PROVENANCE_KEY)
    return None if text is None else json.loads(text)


def gradient(size: tuple[int, int]) -> Image.Image:
    return Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize(size),
            Image.linear_gradient("L").rotate(90).resize(size),
            Image.new("L", size, 128),
        ),
    )


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        assert struct.unpack(">I", data[i + 8 + n : i + 12 + n])[0] == zlib.crc32(kind + body)
        out.append((kind, body))
        i += 12 + n
    return out


def _photo_with_metadata() -> Image.Image:
    """A JPEG as a phone would send it: EXIF with orientation and GPS, an ICC profile, a comment."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "PhoneCo"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    buf = io.BytesIO()
    gradient((96, 64)).save(
        buf, "JPEG", exif=exif.tobytes(), icc_profile=b"\x00ICC" * 64, comment=b"secret", dpi=(300, 300)
    )
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.load()
    assert "exif" in img.info and "icc_profile" in img.info and img.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    return img


def test_encode_png_strips_metadata_and_keeps_only_provenance() -> None:
    src = _photo_with_metadata()
    src.info["parameters"] = "text chunk from another tool"
    prov = {"op": "edit", "prompt": "a café at dusk — ünïcode", "seed": 7, "parents": ["img_a"]}
    data = encode_png(src, provenance=prov)
    chunks = png_chunks(data)
    kinds = [k for k, _ in chunks]
    assert set(kinds) <= {b"IHDR", b"IDAT", b"IEND", b"tEXt"}  # no eXIf, iCCP, pHYs, zTXt, iTXt, tIME
    texts = [body for k, body in chunks if k == b"tEXt"]
    assert len(texts) == 1 and texts[0].startswith(PROVENANCE_KEY.encode() + b"\x00")
    out = Image.open(io.BytesIO(data))
    out.load()
    assert set(out.info) == {PROVENANCE_KEY}
    assert len(out.getexif()) == 0
    assert read_provenance(data) == prov
    assert out.tobytes() == src.convert("RGB").tobytes()  # pixels untouched
    # compact JSON: no spaces after separators, keys sorted
    assert texts[0].split(b"\x00", 1)[1].startswith(b'{"op":"edit","parents":["img_a"]')


def test_encode_png_is_deterministic() -> None:
    img = noise((128, 96), seed=4)
    a = encode_png(img, provenance={"seed": 1, "prompt": "x"})
    b = encode_png(img.copy(), provenance={"prompt": "x", "seed": 1})  # key order does not matter
    assert a == b
    assert encode_png(img) == encode_png(img.copy())
    assert encode_png(img, provenance={"seed": 2, "prompt": "x"}) != a


def test_encode_png_without_provenance_has_no_text() -> None:
    data = encode_png(_photo_with_metadata())
    assert [k for k, _ in png_chunks(data) if k not in (b"IHDR", b"IDAT", b"IEND")] == []
    assert read_provenance(data) is None


def test_encode_png_modes() -> None:
    for img in (
        Image.new("RGBA", (64, 64), (1, 2, 3, 4)),
        Image.new("L", (64, 64), 9),
        gradient((64, 64)).convert("P"),
        Image.new("CMYK", (64, 64), (0, 255, 0, 0)),
    ):
        data = encode_png(img, provenance={"m": img.mode})
        out = Image.open(io.BytesIO(data))
        assert out.mode in ("RGB", "RGBA", "L") and out.size == (64, 64)
        assert read_provenance(data) == {"m": img.mode}


def test_a_photo_like_picture_encodes_smaller_than_at_plain_level_1() -> None:
    """The store's setting (`COMPRESS_TYPE`, run-length matches) against Pillow's level 1 on a smooth picture with
    sensor-like noise: fewer bytes (the speed is tools/bench_png.py's to show), and the same pixels back."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([x, y, (x + y) // 2], axis=-1) + rng.normal(0, 3, (256, 256, 3))
    picture = Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8), "RGB")
    ours = encode_png(picture)
    plain = io.BytesIO()
    picture.save(plain, format="PNG", compress_level=1)
    assert len(ours) < 0.95 * plain.tell(), (len(ours), plain.tell())
    with Image.open(io.BytesIO(ours)) as back:
        assert back.tobytes() == picture.tobytes()
