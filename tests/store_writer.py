"""Child process for the kill -9 test in test_store.py: puts small PNGs in a loop until it is killed.

Usage: python tests/store_writer.py ROOT MAX_IMAGES SEED

Prints "ready" once the store is open, then each image id on its own line, flushed right after put() returns:
a complete line is an acknowledgement, and the parent checks that every acknowledged id survives the kill.
Imports only the store and the standard library (the PNGs are encoded by hand), so it starts fast and proves
that the store needs no torch.
"""

from __future__ import annotations

import random
import struct
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klein_agent

from klein_agent.service.store import ImageStore


def tiny_png(size: int, rng: random.Random) -> bytes:
    """An RGB PNG of random pixels: a valid file that compresses badly, so sizes vary a little."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + rng.randbytes(size * 3) for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def main() -> int:
    root, max_images, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if "torch" in sys.modules:
        return 3
    rng = random.Random(seed)
    store = ImageStore(root, max_images=max_images)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    parent: str | None = None
    while True:
        size = rng.choice((8, 16, 24))
        parents = [parent] if parent else []
        with store.pinned(parents):
            if parent and rng.random() < 0.3:
                store.read_png(parent)  # a touch: an LRU write in flight when the kill lands
            image = store.put(
                tiny_png(size, rng),
                width=size,
                height=size,
                recipe={"tool": "generate", "seed": seed, "prompt": "crash test"},
                parents=parents,
                session="crash",
            )
        sys.stdout.write(image.image_id + "\n")
        sys.stdout.flush()
        parent = image.image_id


if __name__ == "__main__":
    sys.exit(main())
