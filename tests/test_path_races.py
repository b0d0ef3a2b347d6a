"""Races against the path checks: a thread changes the folders while the server reads and exports.

Each test runs a bounded number of tries (under a few seconds here) and prints its counts (`pytest -s` shows
them); the asserts are on those counts. Only public APIs are used (`load_image_argument`, `Studio.export`), so
the same file measures any version of the server:

    python -m pytest -s -p no:cacheprovider tests/test_path_races.py

Before the descriptor walk (klein_agent/service/safe_paths.py) one run of this file on a shared 2-core machine gave:
61 of 200 reads returned the outside file, 36 of 200 exports landed outside (and 28 temporary files were left),
and 88 of the 179 files a thread created during an `overwrite=false` export were replaced. With it: 0, 0 and 0.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image

from klein_agent.rules.calls import Generate
from klein_agent.rules.resolution import RequestError
from klein_agent.service.inputs import ImageInputError, InputPolicy, load_image_argument
from tests.conftest import make_server_state
from tests.fakes import FakeGenerator

TRIES = 200


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def solid_png(path: Path, value: int) -> None:
    Image.fromarray(np.full((64, 64, 3), value, np.uint8), "RGB").save(path, format="PNG")


# The swapper: a separate process, like the hostile local process of the report, so its timing does not hang on
# the test's GIL. It swaps `folder` for a symlink to `outside` and straight back (one renameat2(RENAME_EXCHANGE)
# each way where libc has it, so the folder is never missing; else four renames), each state held
# for PAUSE seconds, until its stdin closes. It prints its swaps.
SWAPPER = """
import ctypes, os, sys, threading, time
folder, outside, PAUSE = sys.argv[1], sys.argv[2], float(sys.argv[3])
link, real = folder + ".link", folder + ".real"
os.symlink(outside, link, target_is_directory=True)
libc = ctypes.CDLL(None, use_errno=True)
exchange = getattr(libc, "renameat2", None)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
a, b = folder.encode(), link.encode()

def swap_twice():
    if exchange is not None:
        for _ in range(2):
            if exchange(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
                raise OSError(ctypes.get_errno(), "renameat2")
            if PAUSE:
                time.sleep(PAUSE)
    else:
        os.rename(folder, real)
        os.rename(link, folder)
        if PAUSE:
            time.sleep(PAUSE)
        os.rename(folder, link)
        os.rename(real, folder)

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
swaps, deadline = 0, time.monotonic() + 30
while not stop.is_set() and time.monotonic() < deadline:
    swap_twice()
    swaps += 1
os.unlink(link)
print(swaps, flush=True)
"""


@contextlib.contextmanager
def swapping(folder: Path, outside: Path, pause: float = 1e-4) -> Iterator[list[int]]:
    """Until the block ends, another process swaps `folder` for a symlink to `outside` and back, over and over.
    Yields a one-item list that holds the number of swaps once the block has ended."""
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(folder), str(outside), str(pause)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    swaps = [0]
    try:
        assert swapper.stdout is not None and swapper.stdout.readline().strip() == "ready"
        yield swaps
    finally:
        out, _ = swapper.communicate(input="", timeout=40)
        swaps[0] = int(out.split()[-1])
        assert swapper.returncode == 0
        assert folder.is_dir() and not folder.is_symlink()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """allowed/sub/img.png (grey 40) and outside/img.png (grey 220): which one a read returned is plain."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    solid_png(allowed / "sub" / "img.png", 40)
    solid_png(outside / "img.png", 220)
    return {"root": tmp_path, "allowed": allowed, "outside": outside}


def no_lookup(image_id: str) -> bytes:
    raise LookupError(image_id)


def test_parent_swapped_for_a_symlink_never_reads_outside(tree: dict[str, Path]) -> None:
    policy = InputPolicy(allowed_dirs=(tree["allowed"],))
    path = str(tree["allowed"] / "sub" / "img.png")
    counts = {"inside": 0, "outside": 0, "refused": 0}
    with swapping(tree["allowed"] / "sub", tree["outside"]) as swaps:
        for _ in range(TRIES):
            try:
                pixel = load_image_argument(path, policy, no_lookup).image.getpixel((0, 0))
            except ImageInputError:
                counts["refused"] += 1
                continue
            counts["inside" if pixel == (40, 40, 40) else "outside"] += 1
    print(f"\nparent-swap reads: {counts} of {TRIES} tries, {swaps[0]} swaps")
    assert counts["outside"] == 0, f"{counts['outside']} of {TRIES} reads returned a file outside"
    assert swaps[0] > 0 and counts["inside"] + counts["refused"] == TRIES


@pytest.fixture
def studio(tmp_path: Path, tree: dict[str, Path]) -> Iterator[Any]:
    made = make_server_state(lambda: FakeGenerator(), tmp_path / "store", tree["allowed"])
    yield made
    made.engine.close()
    made.store.close()


async def stored_image(studio: Any) -> str:
    made = await studio.make(Generate(prompt="a boat", width=64, height=64, seed=1))
    return str(made.images[0].image_id)


def entries(folder: Path, keep: Callable[[str], bool] = lambda _name: True) -> list[str]:
    return sorted(name for name in os.listdir(folder) if keep(name))


@pytest.mark.anyio
async def test_parent_swapped_for_a_symlink_never_exports_outside(studio: Any, tree: dict[str, Path]) -> None:
    image_id = await stored_image(studio)
    sub, outside = tree["allowed"] / "sub", tree["outside"]
    before_outside = entries(outside)
    counts = {"written": 0, "refused": 0}
    with swapping(sub, outside) as swaps:
        for k in range(TRIES):
            try:
                await studio.export(image_id, str(sub / f"out_{k}.png"))
                counts["written"] += 1
            except (ImageInputError, RequestError):
                counts["refused"] += 1
    landed = [n for n in entries(outside) if n not in before_outside]
    temps = entries(sub, lambda n: n.startswith(".")) + [n for n in landed if n.startswith(".")]
    print(
        f"\nparent-swap exports: {counts} of {TRIES} tries, {swaps[0]} swaps; landed outside: {len(landed)}; "
        f"temp files left: {len(temps)}"
    )
    assert landed == [], f"{len(landed)} of {TRIES} exports landed outside the allowed folder"
    assert temps == []
    assert len(entries(sub, lambda n: n.startswith("out_"))) == counts["written"]  # each success is there


@pytest.mark.anyio
async def test_overwrite_false_never_replaces_a_file_created_meanwhile(
    studio: Any, tree: dict[str, Path]
) -> None:
    image_id = await stored_image(studio)
    marker = b"the user's own file, created during the export"
    rng = random.Random(0)
    counts = {"creator_won": 0, "export_won": 0, "replaced": 0}
    for k in range(TRIES):
        target = tree["allowed"] / f"race_{k}.png"
        start = threading.Barrier(2)
        created = threading.Event()
        delay = rng.uniform(0, 0.002)

        def create(
            target: Path = target,
            start: threading.Barrier = start,
            delay: float = delay,
            created: threading.Event = created,
        ) -> None:
            start.wait()
            time.sleep(delay)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return
            created.set()
            os.write(fd, marker)
            os.close(fd)

        creator = threading.Thread(target=create, daemon=True)
        creator.start()
        start.wait()
        exported = True
        try:
            await studio.export(image_id, str(target), overwrite=False)
        except RequestError as exc:
            assert "overwrite=true" in str(exc)
            exported = False
        await anyio.to_thread.run_sync(creator.join, 10)
        if created.is_set():
            counts["creator_won"] += 1
            if target.read_bytes() != marker:
                counts["replaced"] += 1
            assert not exported or target.read_bytes() != marker  # an export that says it wrote did write
        else:
            counts["export_won"] += 1
            assert exported and target.read_bytes().startswith(b"\x89PNG")
    temps = entries(tree["allowed"], lambda n: n.startswith("."))
    print(f"\noverwrite=false vs a creating thread: {counts} of {TRIES} tries; temp files left: {len(temps)}")
    assert counts["replaced"] == 0, f"{counts['replaced']} of {counts['creator_won']} created files replaced"
    assert counts["creator_won"] > 0 and temps == []
