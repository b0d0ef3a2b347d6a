"""A decoded input is its pixels only: none of its file's metadata (ICC profile, EXIF, XMP, PNG text) stays with
it. Pillow keeps all of it in `Image.info` through copy and convert, and a request pickles its pictures whole: a
7 KB PNG with 3 MB of zTXt text (decompressed by Pillow, up to 64 MB) made a FLUX 3 edit's request 5.5 MB where
its pixels are 2.3 MB, so a call `replica.handle.fits_grpc` sent over gRPC (it counts pixels) failed there with
"message larger than max", and the server held the text for the whole call.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from klein_agent.cli import FileDecoder
from klein_agent.rules import limits
from klein_agent.rules.calls import Edit, prepare_call
from klein_agent.service.inputs import InputPolicy, decoding

TEXT_CHUNK = 1_000_000  # under Pillow's 1 MB cap on one decompressed text chunk
ICC = b"\0" * 200_000  # Pillow checks nothing inside a profile; real ones run from 0.5 KB to several MB
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b" " * 30_000 + b"</x:xmpmeta>"  # JPEG takes one 64 KB marker


def picture(mode: str, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A picture with a different value in every pixel's first channel, so any change of pixels shows."""
    base = Image.linear_gradient("L").resize(size)
    if mode == "L":
        return base
    rgb = Image.merge(
        "RGB", (base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("L", size, 90))
    )
    return rgb if mode == "RGB" else rgb.convert(mode)


def exif() -> bytes:
    values = Image.Exif()
    values[0x010E] = "x" * 30_000  # ImageDescription
    return values.tobytes()


def png_with_text(image: Image.Image) -> bytes:
    """PNG with 3 MB of zTXt text (a few KB on disk), an ICC profile and EXIF."""
    text = PngImagePlugin.PngInfo()
    for k in range(3):
        text.add_text(f"comment{k}", "a" * TEXT_CHUNK, zip=True)
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=text, icc_profile=ICC, exif=exif())
    return out.getvalue()


def encoded(fmt: str, image: Image.Image) -> bytes:
    """`image` as `fmt` with as much metadata as Pillow writes into it."""
    if fmt == "PNG":
        return png_with_text(image)
    out = io.BytesIO()
    extra = {"quality": 100} if fmt == "JPEG" else {"lossless": True}
    image.save(out, fmt, icc_profile=ICC, exif=exif(), xmp=XMP, **extra)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("PNG", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "L"),
        ("PNG", "P"),
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("WEBP", "RGB"),
    ],
)
def test_a_decoded_picture_keeps_its_pixels_and_none_of_its_files_metadata(fmt: str, mode: str) -> None:
    source = picture(mode)
    data = encoded(fmt, source)
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        assert opened.info, "the file carries metadata for the decoder to drop"
        plain = io.BytesIO()  # the same pixels without metadata (JPEG: the same quality, so the same pixels)
        kept = {"quality": 100} if fmt == "JPEG" else ({"lossless": True} if fmt == "WEBP" else {})
        source.save(plain, fmt, **kept)
    rgb, kind = decoding.decode(data, max_pixels=limits.INPUT_MAX_PIXELS)
    bare, _ = decoding.decode(plain.getvalue(), max_pixels=limits.INPUT_MAX_PIXELS)
    assert kind == fmt and rgb.mode == "RGB"
    assert rgb.info == {}, sorted(rgb.info)
    assert rgb.tobytes() == bare.tobytes()


@pytest.mark.parametrize(("family", "multiple"), [("flux3", 16), ("flux2", None)])
def test_a_request_pickles_to_its_pixels_and_a_few_kilobytes(
    tmp_path: Path, family: str, multiple: int | None
) -> None:
    """FLUX 3 keeps a single reference whole, and FLUX.2 keeps one as decoded while the model loads (`multiple`
    None): what goes to a replica is the pixels `fits_grpc` counts, plus less than its margin."""
    path = tmp_path / "input.png"
    path.write_bytes(png_with_text(picture("RGB", (1024, 768))))
    prepared = prepare_call(
        Edit(image=str(path), prompt="make it night", seed=1),
        FileDecoder(InputPolicy(allowed_dirs=())),
        multiple=multiple,
        budget=lambda device: (limits.MAX_PIXELS_PER_CALL, ""),
        family=family,
    )
    pixels = sum(3 * p.width * p.height for p in prepared.request.references)
    assert pixels == 3 * 1024 * 768
    assert len(pickle.dumps(prepared.request)) - pixels < limits.RAY_GRPC_MARGIN_BYTES
