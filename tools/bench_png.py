"""How the store's PNG settings trade encode time for bytes: zlib levels and strategies on the pictures given.

    python tools/bench_png.py PHOTO [PHOTO ...] [--side 1024] [--repeat 7]

Each picture is encoded as given and resized to SIDE x SIDE (LANCZOS: smooth, like a generated picture), plus one
of uniform noise (the tiny test model's output, incompressible); per setting, the median encode time of
`--repeat` runs after one warm-up, and the bytes. `klein_agent.service.pngfile` cites what it printed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import zlib

import numpy as np
from PIL import Image

SETTINGS = {
    "level 1": {"compress_level": 1},
    "level 1, Z_RLE": {"compress_level": 1, "compress_type": zlib.Z_RLE},
    "level 1, Z_HUFFMAN_ONLY": {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY},
    "level 6 (Pillow's default)": {"compress_level": 6},
}


def encode(picture: Image.Image, settings: dict[str, int]) -> tuple[float, int]:
    """(ms, bytes) of one PNG encode of `picture` with Pillow's `settings`."""
    start = time.perf_counter()
    out = io.BytesIO()
    picture.save(out, format="PNG", **settings)
    return (time.perf_counter() - start) * 1000, out.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pictures", nargs="*", help="photos to encode (any format Pillow reads)")
    parser.add_argument("--side", type=int, default=1024, help="the resized copy's side (default 1024)")
    parser.add_argument("--repeat", type=int, default=7, help="timed encodes per setting (default 7)")
    args = parser.parse_args()
    cases = []
    for path in args.pictures:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
        cases += [(f"{path} {picture.width}x{picture.height}", picture)]
        cases += [
            (f"{path} at {args.side}²", picture.resize((args.side, args.side), Image.Resampling.LANCZOS))
        ]
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    cases.append(("noise 256²", Image.fromarray(noise, "RGB")))
    for name, picture in cases:
        print(name)
        for label, settings in SETTINGS.items():
            encode(picture, settings)  # warm-up
            runs = [encode(picture, settings) for _ in range(args.repeat)]
            ms = statistics.median(t for t, _ in runs)
            print(f"  {label:28s} {ms:7.1f} ms {runs[0][1]:>10,} bytes")


if __name__ == "__main__":
    main()
