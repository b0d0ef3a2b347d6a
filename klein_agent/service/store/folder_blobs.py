"""`FolderBlobStore`: the `BlobStore` of a local store, one file per blob in one folder.

    <folder>/<key>            one blob (keys are sha256 hex + ".png", `records.blob_key`)
    <folder>/.tmp-<random>    a put in progress, or a crashed one (`sweep_partial` removes it)

A put writes a temporary file, fsyncs it, renames it into place and fsyncs the folder (`files.write_atomically`).
Reads open with O_NOFOLLOW and check the opened file is a regular file, so a symlink planted in the folder cannot
redirect a read outside the store.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from pathlib import Path

from klein_agent.service.files import unlink_quietly, write_atomically
from klein_agent.service.safe_paths import O_BINARY, O_NOFOLLOW
from klein_agent.service.store.blobs import BlobInfo, BlobMissingError
from klein_agent.service.store.records import StoreError, StoreWriteError, folder_problem, write_error_message

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


class FolderBlobStore:
    """Blobs as files in `folder`, created (mode 0700) unless `read_only`. Raises StoreError if the folder cannot
    be made, or is a symlink or a file."""

    def __init__(self, folder: Path, *, read_only: bool = False) -> None:
        self.folder = folder
        self.location = str(folder)
        self.read_only = read_only
        if not read_only:
            try:
                folder.mkdir(exist_ok=True, mode=0o700)
            except OSError as e:
                raise StoreError(
                    f"Cannot create the image folder {folder}: {folder_problem(folder, e)}."
                ) from e
        if not read_only and (folder.is_symlink() or not folder.is_dir()):
            raise StoreError(
                f"Cannot open the image store at {folder.parent}: {folder} must be a plain folder (not a symlink "
                "or a file); move it aside."
            )

    def path_of(self, key: str) -> Path:
        """The file of `key` (a key from `records.blob_key`: no separators)."""
        if key in ("", ".", "..") or "/" in key or "\\" in key or "\0" in key:
            raise ValueError(f"not a blob key: {key!r}")
        return self.folder / key

    def put(self, key: str, data: bytes) -> None:
        """Write the file atomically and durably. Raises StoreWriteError, leaving no file."""
        if self.read_only:
            raise StoreError(f"The image folder {self.folder} is open read-only.")
        try:
            write_atomically(self.path_of(key), data, tmp_prefix=TMP_PREFIX)
        except OSError as e:
            raise StoreWriteError(write_error_message(e, self.folder)) from e

    def get(self, key: str) -> bytes:
        """The file's bytes. Raises BlobMissingError (absent, a symlink, not a regular file) or StoreError."""
        path = self.path_of(key)
        try:
            if O_NOFOLLOW == 0 and os.path.islink(path):  # Windows: no O_NOFOLLOW
                raise OSError(errno.ELOOP, "symlink in the image store")
            fd = os.open(path, os.O_RDONLY | O_BINARY | O_NOFOLLOW)  # POSIX: a planted symlink fails to open
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.EMLINK):
                raise BlobMissingError(f"no blob {key} in {self.folder}") from None
            raise StoreError(f"Cannot read {path}: {e.strerror or e}.") from e
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BlobMissingError(f"{path} is not a regular file")
            return f.read()

    def size(self, key: str) -> int | None:
        """The size of the regular file of `key`, or None (absent, a symlink, anything else)."""
        try:
            st = os.lstat(self.path_of(key))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def delete(self, key: str) -> None:
        """Unlink the file (or whatever was planted under the key), quietly: a failure is logged and leaves an
        orphan, which the sweep removes."""
        unlink_quietly(self.path_of(key))

    def inventory(self) -> dict[str, BlobInfo]:
        """Every entry but temp files and folders (logged and left alone), symlinks as not plain."""
        found: dict[str, BlobInfo] = {}
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    log.warning("image store: ignoring unexpected directory %s", entry.path)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    found[entry.name] = BlobInfo(st.st_size, st.st_mtime, stat.S_ISREG(st.st_mode))
        return found

    def _unlink(self, name: str) -> bool:
        try:
            os.unlink(self.folder / name)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning("image store: cannot remove stray file %s: %s", self.folder / name, e)
            return False
        return True

    def sweep_partial(self, min_age_s: float) -> int:
        """Remove temp files older than `min_age_s` (a put in flight in another process is younger)."""
        removed = 0
        now_s = time.time()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.name.startswith(TMP_PREFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if min_age_s > 0 and now_s - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                        continue
                    removed += self._unlink(entry.name)
        return removed

    def close(self) -> None:
        """Nothing is held open between calls."""
