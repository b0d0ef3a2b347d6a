"""Time of the one decoder (`service/inputs/decoding.decode`) on a 1024x1024 PNG and JPEG of noise, and of the
refusal of a PNG bomb (header only), median of 20 runs each, in this process.

    python tools/bench_decode.py        # run it from another checkout (PYTHONPATH=that checkout) to compare
"""

from __future__ import annotations

import io
import statistics
import struct
import timeit
import zlib

import numpy as np
from PIL import Image

from klein_agent.service.inputs import decoding
from klein_agent.service.inputs.common import ImageInputError


def encoded(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_bomb(side: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def refuse(data: bytes) -> None:
    try:
        decoding.decode(data, max_pixels=64 * 1024**2)
    except ImageInputError:
        return
    raise AssertionError("the bomb was decoded")


def main() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    png, jpeg, bomb = encoded(noise, "PNG"), encoded(noise, "JPEG", quality=90), png_bomb(20000)
    cases = {
        "1024x1024 PNG": lambda: decoding.decode(png, max_pixels=64 * 1024**2),
        "1024x1024 JPEG q90": lambda: decoding.decode(jpeg, max_pixels=64 * 1024**2),
        "20000x20000 PNG bomb refused": lambda: refuse(bomb),
    }
    for name, run in cases.items():
        run()  # warm: imports, first allocation
        times = timeit.repeat(run, number=1, repeat=20)
        print(f"{name}: median {statistics.median(times) * 1e3:.3f} ms (min {min(times) * 1e3:.3f}) of 20")


if __name__ == "__main__":
    main()
