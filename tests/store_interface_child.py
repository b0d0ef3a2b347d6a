"""A child process for tests/test_store_interfaces.py: opens a store over a backend and is killed at one point.

    python tests/store_interface_child.py BACKEND ROOT between-blob-and-row|between-row-and-blob|open-at GO_FILE

between-blob-and-row: put() is killed (SIGKILL) after the blob is written, before the row is inserted.
between-row-and-blob: delete() of the one stored image is killed after the row is deleted, before the blob is.
open-at: waits until GO_FILE exists, then opens the store (two of these race to migrate a new store).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from tests.store_backends import BACKENDS
from tests.store_writer import tiny_png

backend, root, what = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


def die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if what == "open-at":
    go = Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.001)
    BACKENDS[backend](root).close()
    sys.exit(0)
store = BACKENDS[backend](root)
if what == "between-blob-and-row":
    store.catalog.insert = die  # type: ignore[method-assign]
    import random

    store.put(tiny_png(16, random.Random(1)), width=16, height=16, recipe={})
elif what == "between-row-and-blob":
    (image,) = store.list_images()[0]
    store.blobs.delete = die  # type: ignore[method-assign]
    store.delete(image.image_id)
sys.exit(3)  # not killed: the test fails
