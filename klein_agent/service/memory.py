"""Giving memory back to the system after a spike (a large input decoded and dropped)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def release_memory() -> None:
    """Collect garbage and ask glibc to return free heap pages to the system (`malloc_trim(0)`).

    Without it a process that once decoded a 256 MB image keeps that much resident long after the image is gone,
    because glibc holds freed memory in its arenas. Elsewhere only the garbage collection runs."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
