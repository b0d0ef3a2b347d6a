"""Timings of compare_images' core (`klein_agent.service.critique.compare.compare`) and of the whole tool's work.

    python tools/bench_critique.py                 # 1024x1024 pair, 15 runs after 3 warm-ups
    python tools/bench_critique.py --runs 31 --json out.json

The pair is made here, deterministically: a smooth random picture (a 64x64 field of uniform noise, bicubic up to
the size, so it has edges and gradients at every scale), and a copy with sigma-2 noise everywhere (standing in
for the autoencoder's drift) plus two edits of known boxes: one inverted (80x80 at 700,100) and one with +80 red
(220x160 at 300,600), at 1024x1024; other sizes scale the boxes. The report also checks the boxes found against
them, so a fast but wrong change map shows.

Rows:
- `compare`: the pure function on two decoded pictures (what the 100 ms target is about);
- `compare, a 1280x1280 prepared ...`: the same with a picture the edit's preparation scales down first;
- `decode + compare`: both PNGs decoded from bytes, then compared: the tool's work for two images not yet read.

Each row is warmed up, then timed `--runs` times; the median and the 10th/90th percentiles of the wall time and
the calling thread's CPU time are reported. On a shared machine trust the CPU time: it barely moves when other
jobs share the cores (numpy and Pillow run these steps on the calling thread).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from klein_agent.service.critique.compare import compare

BOXES_AT_1024 = ((700, 100, 80, 80), (300, 600, 220, 160))  # scaled with the picture's size


def true_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The two edited boxes (x, y, w, h) for a width x height pair: BOXES_AT_1024 scaled by width/1024, height/1024."""
    sx, sy = width / 1024, height / 1024
    return [(round(x * sx), round(y * sy), round(w * sx), round(h * sy)) for x, y, w, h in BOXES_AT_1024]


def pair(width: int, height: int, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """(before, after) of `width` x `height`: see the module docstring."""
    rng = np.random.default_rng(seed)
    field = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    before = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    after = np.asarray(before).astype(np.int16) + rng.normal(0, 2, (height, width, 3)).round().astype(
        np.int16
    )
    (x1, y1, w1, h1), (x2, y2, w2, h2) = true_boxes(width, height)
    after[y1 : y1 + h1, x1 : x1 + w1] = 255 - after[y1 : y1 + h1, x1 : x1 + w1]
    after[y2 : y2 + h2, x2 : x2 + w2, 0] += 80
    return before, Image.fromarray(after.clip(0, 255).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def timed(fn: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    """Median and 10th/90th percentiles, in ms, of wall time and thread CPU time over `runs` calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append((time.thread_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)

    def pct(values: list[float], q: int) -> float:
        return round(statistics.quantiles(values, n=10, method="inclusive")[q - 1], 1)

    return {
        "wall_ms": round(statistics.median(wall), 1),
        "wall_p10": pct(wall, 1),
        "wall_p90": pct(wall, 9),
        "cpu_ms": round(statistics.median(cpu), 1),
    }


def _matches(true: tuple[int, int, int, int], found: tuple[int, int, int, int]) -> bool:
    """Whether `found` is `true` on the token grid: it covers at least 90 % of the true box (a sliver of a token,
    under CHANGE_MIN_COVER of it, may be left out) and reaches at most one token (16 px) beyond it on each side."""
    tx, ty, tw, th = true
    fx, fy, fw, fh = found
    overlap = max(0, min(tx + tw, fx + fw) - max(tx, fx)) * max(0, min(ty + th, fy + fh) - max(ty, fy))
    within = fx >= tx - 16 and fy >= ty - 16 and fx + fw <= tx + tw + 16 and fy + fh <= ty + th + 16
    return within and overlap >= 0.9 * tw * th


def main(argv: list[str] | None = None) -> int:
    """Run the rows, print a table (and write JSON with --json). Exit status 1 when a true box has no found box
    that matches it (`_matches`)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="1024x1024", help="WxH of the pair (default 1024x1024)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    before, after = pair(width, height)
    other = before.resize((1280, 1280), Image.Resampling.LANCZOS) if (width, height) == (1024, 1024) else None
    png_a, png_b = png(before), png(after)

    def decode_and_compare() -> object:
        with Image.open(io.BytesIO(png_a)) as a, Image.open(io.BytesIO(png_b)) as b:
            return compare(a.convert("RGB"), b.convert("RGB"))

    rows = {f"compare {width}x{height}": timed(lambda: compare(before, after), args.warmup, args.runs)}
    if other is not None:
        rows["compare, a 1280x1280 prepared to b 1024x1024"] = timed(
            lambda: compare(other, after), args.warmup, args.runs
        )
    rows[f"decode 2 PNGs + compare {width}x{height}"] = timed(decode_and_compare, args.warmup, args.runs)

    result = compare(before, after)
    print(f"{'row':58} {'wall ms (p10-p90)':>22} {'cpu ms':>8}")
    for name, row in rows.items():
        print(f"{name:58} {row['wall_ms']:>8} ({row['wall_p10']}-{row['wall_p90']}) {row['cpu_ms']:>8}")
    print(f"verdict: {result.verdict}")
    print(f"overlay: {len(result.overlay)} bytes {result.overlay_mime_type} {result.overlay_size}")
    found = [r.box_px for r in result.regions]
    ok = all(any(_matches(true, box) for box in found) for true in true_boxes(width, height))
    print(f"boxes found {found} vs true {true_boxes(width, height)}: {'ok' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "found": found, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
