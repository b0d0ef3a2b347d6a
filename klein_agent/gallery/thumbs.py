"""WebP thumbnails of stored images, made once and kept on disk in the folder the command passes in (by default
`<store>/thumbs/`: `option_types.store_locations`).

The folder is never the store's blob folder: the store's sweep removes every blob that has no record, and never
looks anywhere else. A thumbnail's name derives from the image's blob key (a hash of its validated id) and the
edge, never from anything a request says. Thumbnails of evicted images are
removed by `prune` when a gallery starts.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from klein_agent.service.files import unlink_quietly, write_atomically
from klein_agent.service.safe_paths import O_BINARY, O_NOFOLLOW
from klein_agent.service.store import ImageStore, StoredImage

log = logging.getLogger(__name__)

THUMB_EDGE = 320  # px, long edge: sharp on a 2x screen at the cards' 160 px
_QUALITY = 80
_TMP_PREFIX = ".tmp-"
_TMP_MAX_AGE_S = 60.0
_MAX_THUMB_BYTES = 4 * 2**20  # far above any real thumbnail: a larger file there is not ours


class Thumbnails:
    """The thumbnail cache of one store. Thread-safe: two requests for one thumbnail may both make it (the
    atomic rename keeps the file whole), which is cheaper than a lock around every encode."""

    def __init__(self, store: ImageStore, folder: Path, *, edge: int = THUMB_EDGE) -> None:
        self.store = store
        self.edge = edge
        self.folder = folder
        self._cache_ok = True
        self._warned = threading.Event()
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            if self.folder.is_symlink() or not self.folder.is_dir():
                raise OSError(errno.ENOTDIR, "not a plain folder")
        except OSError as exc:
            self._cache_ok = False
            log.warning("thumbnails are not cached (cannot use %s: %s)", self.folder, exc.strerror or exc)

    def webp(self, image: StoredImage) -> bytes:
        """The WebP thumbnail of `image` (long edge at most `edge` px, never upscaled): from the cache, else made
        from the stored PNG and cached. Raises UnknownImageError if the image is gone."""
        path = self._path(image)
        cached = self._read(path) if self._cache_ok else None
        if cached is not None:
            return cached
        data = self._make(self.store.read_png(image.image_id))
        if self._cache_ok:
            try:
                write_atomically(path, data, tmp_prefix=_TMP_PREFIX)
            except OSError as exc:
                if not self._warned.is_set():
                    self._warned.set()
                    log.warning("cannot cache thumbnails in %s: %s", self.folder, exc.strerror or exc)
        return data

    def prune(self, live: Iterable[StoredImage]) -> int:
        """Remove the thumbnails of images no longer in the store, and temp files a crash left; returns how many.

        The folder is listed before `live` is read, so a thumbnail made meanwhile (its image is in the store) is
        never removed."""
        if not self._cache_ok:
            return 0
        now = time.time()
        try:
            with os.scandir(self.folder) as entries:
                names = [
                    entry.name
                    for entry in entries
                    if entry.is_file(follow_symlinks=False) or entry.is_symlink()
                    if not entry.name.startswith(
                        _TMP_PREFIX
                    )  # another gallery's write in progress, or a crash's
                    or now - entry.stat(follow_symlinks=False).st_mtime > _TMP_MAX_AGE_S
                ]
        except OSError:
            return 0
        keep = {self._path(image).name for image in live}
        removed = 0
        for name in names:
            if name not in keep:
                unlink_quietly(self.folder / name)
                removed += 1
        return removed

    def _path(self, image: StoredImage) -> Path:
        return self.folder / f"{Path(image.blob_key).stem}-{self.edge}.webp"

    def _make(self, png: bytes) -> bytes:
        from klein_agent.service.pixels import to_rgb  # numpy: imported at the first thumbnail, not at start

        with Image.open(io.BytesIO(png)) as opened:
            picture = to_rgb(opened)
        picture.thumbnail((self.edge, self.edge), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        picture.save(out, format="WEBP", quality=_QUALITY, method=4)
        return out.getvalue()

    @staticmethod
    def _read(path: Path) -> bytes | None:
        """The cached file's bytes, or None if it is missing or not a plain file of a plausible size (a symlink
        planted there is never followed)."""
        try:
            fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_BINARY)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= _MAX_THUMB_BYTES:
                return None
            with contextlib.suppress(OSError):
                return handle.read()
        return None
