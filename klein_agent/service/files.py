"""Durable, atomic file writes: the one way the store and exports put bytes on disk."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

from klein_agent.service.safe_paths import O_BINARY, write_all

log = logging.getLogger(__name__)


def write_atomically(target: Path, data: bytes, *, tmp_prefix: str = ".tmp-", mode: int = 0o600) -> None:
    """Write `data` to `target` so that a reader or a crash sees the old file or the whole new one, never a part.

    A temporary file in the same folder (`tmp_prefix` + random hex, created exclusively with `mode` before the
    umask), written and fsynced, renamed over `target`, then the folder fsynced so the rename survives a power
    loss. Raises OSError; on failure no temporary file is left, and a target whose rename could not be made
    durable is removed again.
    """
    folder = target.parent
    tmp = folder / f"{tmp_prefix}{secrets.token_hex(8)}"
    fd = -1
    placed = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY, mode)
        write_all(fd, data)
        os.fsync(fd)
        fd, closing = -1, fd  # the fd is gone even if close() fails
        os.close(closing)
        os.replace(tmp, target)
        placed = True
        fsync_dir(folder)
    except OSError:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        unlink_quietly(tmp)
        if placed:
            unlink_quietly(target)
        raise


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable. POSIX only: Windows cannot open a folder, and
    NTFS journals its metadata. Raises OSError."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    """Remove a file if it is there. A file already gone is no error; any other failure is logged, not raised
    (callers use this to clean up after an error they are already reporting)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)
