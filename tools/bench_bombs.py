"""Peak memory of a real `klein-agent serve --http` process (tiny model) given decompression bombs, through the
official MCP client (issue 18, point 2).

    python tools/bench_bombs.py            # figures on stdout; run it from another checkout to measure that one

Cases: one 8192x8192 lossless WebP (a few KB), one 8192x8192 PNG, a compose of four such WebPs, four such composes
at once; then the same at the largest accepted sizes (`limits.FULL_DECODE_MAX_PIXELS`, where the checkout has them).
The figure is the server's peak resident memory above its level before the call (VmHWM, reset through
/proc/PID/clear_refs before each case), so no spike is missed between samples. Linux only.
"""

from __future__ import annotations

import base64
import io
import math
import os
import sys
import tempfile
from pathlib import Path

import anyio
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import REPO, connect, start_http, stop


def vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def uri(fmt: str, side: int) -> str:
    buf = io.BytesIO()
    picture = Image.new("RGBA", (side, side), (40, 90, 200, 128))
    picture.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {"compress_level": 1}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


async def case(pid: int, port: int, token: str, name: str, images: list[str], together: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    start = vm_kb(pid, "VmRSS")
    answers: list[str] = []

    async def one(k: int) -> None:
        async with connect(port, token) as client:
            tool = "edit" if len(images) == 1 else "compose"
            args = {"prompt": f"bomb {k}", "width": 64, "height": 64}
            args |= {"image": images[0]} if tool == "edit" else {"images": images}
            result = await client.call_tool(tool, args)
            text = result.content[0].text if result.content and hasattr(result.content[0], "text") else ""
            answers.append(("refused: " + text[:90]) if result.is_error else "answered")

    async with anyio.create_task_group() as tg:
        for k in range(together):
            tg.start_soon(one, k)
    growth = max(0, vm_kb(pid, "VmHWM") - start) / 1024  # the reset sets the peak to the RSS of that moment
    print(f"{name}: peak growth +{growth:.0f} MB; {sorted(set(answers))}", flush=True)


async def main_async() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="klein-bombs-"))
    proc, port, token = start_http(scratch, "store", "--max-queue", "8")
    try:
        async with connect(port, token) as client:
            await client.call_tool("generate", {"prompt": "warm-up", "width": 64, "height": 64})
        webp, png = uri("WEBP", 8192), uri("PNG", 8192)
        print(f"checkout {REPO}; 8192x8192 WebP data URI {len(webp)} chars, PNG {len(png)} chars", flush=True)
        cases = [("one 8192² WebP", [webp], 1), ("one 8192² PNG", [png], 1)]
        cases += [
            ("compose of four 8192² WebPs", [webp] * 4, 1),
            ("four such composes at once", [webp] * 4, 4),
        ]
        sys.path.insert(0, str(REPO))  # this checkout's limits, as the server it started
        try:
            from klein_agent.rules.limits import FULL_DECODE_MAX_PIXELS as caps
        except ImportError:
            caps = {}
        if caps:
            w, p = math.isqrt(caps["WEBP"]), math.isqrt(caps["PNG"])
            at_cap_webp, at_cap_png = uri("WEBP", w), uri("PNG", p)
            cases += [
                (f"one {w}² WebP (its cap)", [at_cap_webp], 1),
                (f"one {p}² PNG (its cap)", [at_cap_png], 1),
            ]
            cases += [(f"compose of four {w}² WebPs", [at_cap_webp] * 4, 1)]
            cases += [("four such composes at once", [at_cap_webp] * 4, 4)]
        for name, images, together in cases:
            await case(proc.pid, port, token, name, images, together)
    finally:
        stop(proc)


def main() -> int:
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("needs Linux (/proc)")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    anyio.run(main_async)
    return 0


if __name__ == "__main__":
    sys.exit(main())
