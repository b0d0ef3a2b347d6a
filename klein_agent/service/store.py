"""The persistent image store: PNG files on disk, metadata, lineage and LRU bookkeeping in SQLite.

Scope: everything the server keeps between calls and across restarts. It imports no torch (nor anything that
does), so a store can be opened, swept and read in milliseconds, by the server and by a crash-test child alike.

Layout under `root`:
    store.sqlite3 (+ -wal, -shm)   metadata, WAL mode; never copy it while open (use VACUUM INTO)
    store.lock                     inter-process lock; the holder of the exclusive lock may sweep
    images/<sha256(id)>.png        one file per image; the name derives from the id only, never from user text
    images/.tmp-<random>           a write in progress, or a crashed one (removed by the next sweep)
    thumbs/                        the gallery's WebP thumbnails (klein_agent.gallery.thumbs); the store never
                                   reads it, and its sweep looks only in images/

A store opened with `read_only=True` (the gallery, beside a running server) reads through a read-only SQLite
connection: no lock, no sweep, no eviction, no migration, and reads do not count as uses for the LRU.

Crash-safety invariant: an image file is durable (written, fsynced, renamed into place, directory fsynced)
before its row is committed, and a row is deleted and committed before its file is unlinked. A row therefore
never points at a missing file; at worst a file has no row (an orphan), and the sweep at open removes it.

Leases (`service/leases.py`): an image a running call uses, in this process or another, is leased in the catalog and
never evicted while its lease is unexpired; a lease of a process that died expires and is then ignored.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klein_agent.rules.limits import (
    LEASE_RENEW_S,
    LEASE_TTL_S,
    MAX_CURSOR_CHARS,
    MAX_LIST_LIMIT,
    STORE_MAX_BYTES,
    STORE_MAX_IMAGES,
)
from klein_agent.rules.resolution import check_session
from klein_agent.service import leases
from klein_agent.service.error_text import describe
from klein_agent.service.files import unlink_quietly, write_atomically

if sys.platform != "win32":
    import fcntl

__all__ = [
    "ImageStore",
    "Lease",
    "Migration",
    "SessionSummary",
    "StoreError",
    "StoreFullError",
    "StoreStats",
    "StoreWriteError",
    "StoredImage",
    "UnknownImageError",
    "default_store_dir",
    "new_image_id",
]

log = logging.getLogger(__name__)

ID_PREFIX = "img_"
_ID_RE = re.compile(r"img_[A-Za-z0-9_-]{22}", re.ASCII)  # "img_" + token_urlsafe(16): 22 chars, 128 bits
_CURSOR_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CURSOR_CHARS}}}", re.ASCII)
_MAX_SQLITE_INTEGER = 2**63 - 1
# The key a damaged recipe is read with (`_read_recipe`): its value says what is wrong.
UNREADABLE_RECIPE = "unreadable"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TMP_PREFIX = ".tmp-"
DB_NAME = "store.sqlite3"
LOCK_NAME = "store.lock"
IMAGES_DIR = "images"
MAX_PARENTS = 256
MAX_RECIPE_BYTES = 256 * 1024
# Orphans and temp files younger than this are left alone when another process may be mid-put (see _sweep).
_SHARED_SWEEP_MIN_AGE_S = 3600.0
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX: a symlink planted in images/ fails to open


class StoreError(Exception):
    """Base class of every error the store raises on purpose; the message says what to do next."""


class UnknownImageError(StoreError, LookupError):
    """An id that is malformed or absent. One message for both, so the store is no existence oracle."""

    def __init__(self, image_id: object) -> None:
        self.image_id = image_id
        text = image_id if isinstance(image_id, str) else repr(image_id)
        shown = text if len(text) <= 40 else text[:40] + "..."
        super().__init__(f"Unknown image id {shown!r}. Call list_images to see the ids in the store.")


class StoreFullError(StoreError):
    """The image cannot fit in the quota: it is larger than the quota, or pinned images fill it."""


class StoreWriteError(StoreError):
    """An I/O error (disk full, permissions) while saving; the store is left as it was before the call."""


@dataclass(frozen=True)
class StoredImage:
    """One image's record in the store: its id, size in px, PNG size in bytes, lineage and recipe."""

    image_id: str
    width: int
    height: int
    size_bytes: int
    created_at: float  # unix time
    session: str | None
    parents: tuple[str, ...]  # in the order given to put(); a parent may have been evicted since
    recipe: dict[str, Any]  # as given to put(), after a JSON round trip (tuples come back as lists)
    path: Path  # absolute path of the PNG


@dataclass(frozen=True)
class StoreStats:
    """What the store holds (images, bytes) against its bounds, and where it lives."""

    count: int
    total_bytes: int
    max_bytes: int
    max_images: int
    root: Path


@dataclass(frozen=True)
class SessionSummary:
    """One session label (None: images stored without one), its image count, and when its first and last images
    were stored (unix time)."""

    session: str | None
    count: int
    first_at: float
    last_at: float


@dataclass(frozen=True)
class Migration:
    """One append-only schema step. Applied once, in version order, recorded in `_migrations`."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "images table",
        (
            """CREATE TABLE images (
                seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: list() is newest first
                image_id     TEXT    NOT NULL UNIQUE,
                width        INTEGER NOT NULL,
                height       INTEGER NOT NULL,
                size_bytes   INTEGER NOT NULL,
                created_at   REAL    NOT NULL,
                last_used_at REAL    NOT NULL,
                use_seq      INTEGER NOT NULL,  -- logical LRU clock: immune to clock steps and timer resolution
                session      TEXT,
                parents      TEXT    NOT NULL,  -- JSON array of ids
                recipe       TEXT    NOT NULL   -- JSON object
            )""",
            "CREATE INDEX images_by_use ON images(use_seq)",
            "CREATE INDEX images_by_session ON images(session, seq)",
        ),
    ),
    Migration(
        2,
        "content keys: an input imported twice is stored once",
        (
            "ALTER TABLE images ADD COLUMN content_key TEXT",
            "CREATE INDEX images_by_content ON images(content_key)",
        ),
    ),
    Migration(3, "leases: pins that hold across processes", leases.SCHEMA),
]

_COLUMNS = "image_id, width, height, size_bytes, created_at, session, parents, recipe"


def new_image_id() -> str:
    """A fresh opaque id: 128 random bits, so ids can be neither guessed nor enumerated."""
    return ID_PREFIX + secrets.token_urlsafe(16)


def _why_not(root: Path, error: OSError) -> str:
    """Why the store folder `root` cannot be made or used, in words a user can act on."""
    for part in (root, *root.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                return f"{part} is a file, not a folder"
            break
    if error.errno == errno.EROFS:
        return "it is on a read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write there ({error.strerror})"
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    return error.strerror or str(error)


def store_source(given: Path | str | None) -> str:
    """Which setting chose the store folder, for messages: `--store DIR`, `$KLEIN_AGENT_STORE`, or the default
    (with the two ways to choose another)."""
    if given is not None:
        return "the folder given with --store: pass another --store DIR"
    if os.environ.get("KLEIN_AGENT_STORE", "").strip():
        return "the folder $KLEIN_AGENT_STORE names: set it to another folder, or pass --store DIR"
    return "the default folder: choose another with --store DIR or $KLEIN_AGENT_STORE"


def default_store_dir() -> Path:
    """$KLEIN_AGENT_STORE, else the user's data folder + klein-agent/store. Never a temp dir: images must
    survive reboots and tmp cleaners."""
    env = os.environ.get("KLEIN_AGENT_STORE", "").strip()
    if env:
        return Path(env).expanduser().absolute()
    home = Path.home()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA", "")
        data = Path(local) if local else home / "AppData" / "Local"
    elif sys.platform == "darwin":
        data = home / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")  # the XDG spec says to ignore a relative path
        data = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"
    return data / "klein-agent" / "store"


def read_only_uri(database: Path, *, folder_writable: bool) -> str:
    """The SQLite URI that opens `database` for reading only.

    `mode=ro` alone still needs the WAL side files (-shm, -wal): SQLite creates them when missing, which fails in
    a folder that cannot be written (a read-only filesystem, a backup mounted read-only). There `immutable=1` is
    added: SQLite then reads the main file as it is, without side files or locks; what a WAL file beside it holds
    and was not yet checkpointed is not seen, and no one can be writing the store there anyway.
    """
    query = "mode=ro" if folder_writable else "mode=ro&immutable=1"
    return f"{database.as_uri()}?{query}"


class ImageStore:
    """A bounded, crash-safe, thread-safe store of PNG images and how they were made.

    Threading: one SQLite connection (check_same_thread=False) behind one re-entrant lock. Statements are
    short, and file payloads are written and read outside the lock, so the lock costs little, and it makes
    "check pins, evict, commit" and "check the row, open the file" atomic within the process.
    Several processes may share a store: SQLite serialises their writes, and only a process that holds the
    lock file exclusively sweeps orphans. Pins are leases in the catalog, so they hold across processes
    (`lease`, `pinned`); a thread renews this store's leases every `lease_renew_s` seconds until they are
    released, and each expires `lease_ttl_s` seconds after its last renewal (`clock`: Unix time, which tests move).

    `read_only=True` opens an existing store for reading only (see the module docstring); the bounds are then
    unused, `put` raises StoreError, and a missing store or an unknown schema raises StoreError at once.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        max_bytes: int = STORE_MAX_BYTES,
        max_images: int = STORE_MAX_IMAGES,
        read_only: bool = False,
        lease_ttl_s: float = LEASE_TTL_S,
        lease_renew_s: float = LEASE_RENEW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("max_bytes", max_bytes), ("max_images", max_images)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < lease_renew_s < lease_ttl_s:
            raise ValueError(
                f"lease_renew_s must be above 0 and below lease_ttl_s, got {lease_renew_s!r} and {lease_ttl_s!r}"
            )
        self.root = Path(root).expanduser().resolve()
        self.max_bytes = max_bytes
        self.max_images = max_images
        self._images = self.root / IMAGES_DIR
        self._lock = threading.RLock()
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._holders: set[str] = set()  # this store's live leases, renewed together
        self._renewer = leases.Renewer(self.renew_leases, lease_renew_s)
        self._pid = os.getpid()
        self._closed = False
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self.read_only = read_only
        if read_only:
            self._open_read_only()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._images.mkdir(exist_ok=True, mode=0o700)
        except OSError as e:
            raise StoreError(
                f"Cannot create the image store at {self.root}: {_why_not(self.root, e)}."
            ) from e
        if self._images.is_symlink() or not self._images.is_dir():
            raise StoreError(
                f"Cannot open the image store at {self.root}: {self._images} must be a plain folder (not a "
                "symlink or a file); move it aside."
            )
        try:
            try:
                sole_user = self._lock_process()
            except OSError as e:
                raise StoreError(
                    f"Cannot open the image store at {self.root}: {_why_not(self.root, e)}."
                ) from e
            self._conn = self._connect()
            self._migrate()
            with self._locked(), self._transaction():
                leases.purge_expired(self._execute, self._clock())
            self._sweep(min_age_s=0.0 if sole_user else _SHARED_SWEEP_MIN_AGE_S)
            with self._locked(), self._transaction():  # the quota may have been lowered since the last run
                evicted = self._evict_locked(keep=None)
            self._unlink_files(evicted)
            if sole_user and sys.platform != "win32" and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # let other processes in
        except BaseException:
            self.close()
            raise

    # ---- public API -------------------------------------------------------------------------------------

    @staticmethod
    def is_valid_id(image_id: str) -> bool:
        """The strict shape check that runs before any SQL or filesystem use of an id."""
        return isinstance(image_id, str) and _ID_RE.fullmatch(image_id) is not None

    def put(
        self,
        png: bytes,
        *,
        width: int,
        height: int,
        recipe: dict[str, Any],
        parents: Sequence[str] = (),
        session: str | None = None,
        image_id: str | None = None,
        content_key: str | None = None,
    ) -> StoredImage:
        """Store one PNG durably; when this returns, the image survives a crash or kill -9.

        `image_id` is a fresh id from `new_image_id()` when the caller needs it before the image is stored (an
        input that is named as a parent but stored only once the call succeeds); by default one is minted here.
        `content_key` (e.g. a digest of the pixels) lets `find_content` return this image for the same content.
        The file is made durable first and the row committed second (see the module docstring). The LRU
        eviction runs in the same transaction as the insert, so quota and row agree at every commit; evicted
        files are unlinked after the commit. `parents` are recorded as given, also those no longer stored (an
        input deleted while the call that used it ran): a finished picture is never lost for its lineage, and
        `absent` tells which parents are gone. Raises ValueError for a malformed argument, UnknownImageError for
        a malformed parent id, StoreFullError, StoreWriteError.
        """
        if self.read_only:
            raise StoreError(
                f"The image store at {self.root} is open read-only; nothing can be stored through it."
            )
        data = _check_png(png, width, height)
        recipe_json = _recipe_json(recipe)
        session = check_session(session)
        if isinstance(parents, str):
            raise TypeError("parents must be a sequence of image ids, not one id string")
        parent_ids = tuple(parents)
        if len(parent_ids) > MAX_PARENTS:
            raise ValueError(f"at most {MAX_PARENTS} parents, got {len(parent_ids)}")
        for parent in parent_ids:
            if not self.is_valid_id(parent):
                raise UnknownImageError(parent)
        if len(data) > self.max_bytes:
            raise StoreFullError(
                f"The image is {len(data)} bytes, larger than the whole store quota ({self.max_bytes} bytes). "
                "Use a smaller size or raise the store quota."
            )
        if image_id is not None and not self.is_valid_id(image_id):
            raise ValueError(f"image_id {image_id!r} is not an id from new_image_id()")
        with self._locked():
            pass  # fail fast on a closed store, before writing a file
        image_id = image_id or new_image_id()
        path = self._path_for(image_id)
        self._write_file(path, data)
        try:
            with self._locked():
                created_at, evicted = self._insert_locked(
                    image_id, width, height, len(data), session, parent_ids, recipe_json, content_key
                )
        except StoreError:  # ours: raised inside the transaction, which rolled back
            unlink_quietly(path)
            raise
        except BaseException as exc:
            committed = self._committed(image_id)
            if committed is False:
                unlink_quietly(path)
            # None: we cannot tell; keep the file, because an orphan is swept but a row without a file is not
            if not isinstance(exc, (OSError, sqlite3.Error)):
                raise
            if committed is not True:
                raise StoreWriteError(_write_error_message(exc, self.root)) from exc
            log.warning(
                "put: %s raised after the record was committed; the image is kept", type(exc).__name__
            )
            created_at, evicted = time.time(), []
        self._unlink_files(evicted)
        if evicted:
            log.debug("evicted %d image(s) to stay within the store quota", len(evicted))
        return StoredImage(
            image_id, width, height, len(data), created_at, session, parent_ids, json.loads(recipe_json), path
        )

    def get(self, image_id: str) -> StoredImage:
        """Metadata of one image. Counts as a use for the LRU."""
        with self._locked():
            image = self._select_locked(image_id)
            self._touch_locked(image_id)
        try:
            st = os.lstat(image.path)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != image.size_bytes:
            log.warning(
                "the file of image %s is missing or damaged; the next open drops its record", image_id
            )
            raise UnknownImageError(image_id)
        return image

    def read_png(self, image_id: str) -> bytes:
        """The PNG bytes of one image. Counts as a use for the LRU.

        The file is opened under the lock, so an eviction cannot unlink it between the row check and the
        open; once open, POSIX lets us read it even if it is unlinked next. O_NOFOLLOW plus an fstat check
        make sure a symlink planted in images/ cannot redirect the read outside the store.
        """
        with self._locked():
            image = self._select_locked(image_id)
            try:
                if _O_NOFOLLOW == 0 and os.path.islink(image.path):  # Windows: no O_NOFOLLOW
                    raise OSError(errno.ELOOP, "symlink in the image store")
                fd = os.open(image.path, os.O_RDONLY | _O_BINARY | _O_NOFOLLOW)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ELOOP, errno.EMLINK):
                    log.warning(
                        "the file of image %s is missing or is a symlink; refusing to read it", image_id
                    )
                    raise UnknownImageError(image_id) from None
                raise StoreError(f"Cannot read image {image_id}: {e.strerror or e}.") from e
            self._touch_locked(image_id)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != image.size_bytes:
                log.warning("the file of image %s is damaged; refusing to read it", image_id)
                raise UnknownImageError(image_id)
            return f.read()

    def exists(self, image_id: str) -> bool:
        """Whether the id names a stored image. Not a use: the LRU is untouched."""
        if not self.is_valid_id(image_id):
            return False
        with self._locked():
            return self._stored_locked(image_id)

    def delete(self, image_id: str) -> None:
        """Remove one image (row first, committed, then its file: a row never points at a missing file).
        Best effort: an id that is gone already, or a store that cannot be written now, is logged, not raised
        (callers use it to undo part of a call that failed)."""
        if not self.is_valid_id(image_id):
            return
        try:
            with self._locked(), self._transaction():
                self._execute("DELETE FROM images WHERE image_id = ?", (image_id,))
        except (StoreError, sqlite3.Error, OSError) as exc:
            log.warning("could not remove %s from the store: %s", image_id, exc)
            return
        self._unlink_files([image_id])

    def find_content(self, content_key: str) -> StoredImage | None:
        """The newest image stored with this `content_key`, or None."""
        with self._locked():
            row = self._execute(
                f"SELECT {_COLUMNS} FROM images WHERE content_key = ? ORDER BY seq DESC LIMIT 1",
                (content_key,),
            ).fetchone()
        return None if row is None else self._image_from_row(row)

    def list(
        self, *, session: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[builtins.list[StoredImage], str | None]:
        """One page of images, newest first, optionally of one session; returns (page, next_cursor or None).

        Keyset pagination on the insertion sequence: pages stay stable while images are added or evicted.
        """
        session = check_session(session)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, got {limit!r}")
        before = None if cursor is None else _decode_cursor(cursor, session)
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if session is not None:
            where.append("session = ?")
            params.append(session)
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        sql = f"SELECT seq, {_COLUMNS} FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._locked():
            rows = self._execute(sql, (*params, limit + 1)).fetchall()
        page = [self._image_from_row(row[1:]) for row in rows[:limit]]
        next_cursor = _encode_cursor(rows[limit - 1][0], session) if len(rows) > limit else None
        return page, next_cursor

    def sessions(self) -> builtins.list[SessionSummary]:
        """Every session with its image count and first and last times, the one with the newest image first."""
        with self._locked():
            rows = self._execute(
                "SELECT session, COUNT(*), MIN(created_at), MAX(created_at) FROM images"
                " GROUP BY session ORDER BY MAX(seq) DESC"
            ).fetchall()
        return [SessionSummary(session, count, first, last) for session, count, first, last in rows]

    def pinned(self, image_ids: Iterable[str]) -> Lease:
        """Protect stored images from eviction, by every process, while a call uses them: a `lease` on them,
        released when the `with` block exits. Re-entrant and counted: an image stays pinned until every lease
        on it is released. Raises UnknownImageError (leasing nothing) if an id is not in the store, so a call
        learns at once that its input is gone."""
        if isinstance(image_ids, str):
            raise TypeError("pinned() takes a collection of image ids; use pinned([image_id])")
        lease = self.lease()
        try:
            lease.add(image_ids)
        except BaseException:
            lease.release()
            raise
        return lease

    def lease(self) -> Lease:
        """A new, empty lease (no catalog write yet): add ids to it as a call learns them, release it when the
        call ends (it is a context manager). Raises StoreError on a read-only or closed store."""
        if self.read_only:
            raise StoreError(
                f"The image store at {self.root} is open read-only; it cannot hold images in use."
            )
        with self._locked():
            pass
        return Lease(self, "lease_" + secrets.token_urlsafe(12))

    def take_leases(self, holder: str, image_ids: Iterable[str], *, require_stored: bool = True) -> None:
        """Catalog operation: lease `image_ids` to `holder` until `lease_ttl_s` from now, renewed until
        `release_leases(holder)`. With `require_stored`, every id must be stored now, or UnknownImageError is
        raised and nothing is leased (the check and the lease are one transaction, so what was found stays).
        Without it, ids not stored yet are leased too, for when they are stored."""
        if isinstance(image_ids, str):
            raise TypeError("take_leases() takes a collection of image ids, not one id string")
        ids = tuple(image_ids)
        for image_id in ids:
            if not self.is_valid_id(image_id):
                raise UnknownImageError(image_id)
        with self._locked():
            with self._transaction():
                if require_stored:
                    for image_id in ids:
                        if not self._stored_locked(image_id):
                            raise UnknownImageError(image_id)
                leases.take(self._execute, holder, ids, self._clock() + self.lease_ttl_s)
            self._holders.add(holder)
        self._renewer.start()

    def renew_leases(self) -> None:
        """Catalog operation: move every live lease of this store to `lease_ttl_s` from now (what the renewing
        thread runs every `lease_renew_s`)."""
        with self._locked():
            if self._holders:
                with self._transaction():
                    leases.renew(self._execute, self._holders, self._clock() + self.lease_ttl_s)

    def release_leases(self, holder: str) -> None:
        """Catalog operation: end `holder`'s leases (and purge those that expired). Best effort, like `delete`:
        a store that cannot be written now is logged, and the lease then lapses at its expiry."""
        with self._lock:
            self._holders.discard(holder)
            if self._closed:
                return
        try:
            with self._locked(), self._transaction():
                leases.release(self._execute, holder, self._clock())
        except (StoreError, sqlite3.Error, OSError) as exc:
            log.warning("could not release the images a call used (they are freed at expiry): %s", exc)

    def absent(self, image_ids: Iterable[str]) -> builtins.list[str]:
        """The ids among `image_ids` that are not stored (now), in their order, without repeats."""
        with self._locked():
            return [
                i for i in dict.fromkeys(image_ids) if not self.is_valid_id(i) or not self._stored_locked(i)
            ]

    def stats(self) -> StoreStats:
        """The current image count and total PNG bytes, with the store's bounds and root."""
        with self._locked():
            count, total = self._execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM images"
            ).fetchone()
        return StoreStats(count, total, self.max_bytes, self.max_images, self.root)

    def close(self) -> None:
        """Release this store's leases, close the database and release the lock file. Idempotent; later calls
        raise StoreError."""
        self._renewer.stop()
        for holder in list(self._holders):
            self.release_leases(holder)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._conn is not None:
                self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageStore({str(self.root)!r}, max_bytes={self.max_bytes}, max_images={self.max_images})"

    # ---- internals ----------------------------------------------------------------------------------------

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Every statement goes through here: the one seam that fault-injection tests patch."""
        assert self._conn is not None
        return self._conn.execute(sql, params)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._closed or self._conn is None:
                raise StoreError("The image store is closed.")
            if os.getpid() != self._pid:  # SQLite connections must not cross fork()
                raise StoreError("This ImageStore was opened before a fork; open a new one in this process.")
            yield

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE takes the write lock up front, so a read-then-write never fails half way with
        SQLITE_BUSY; the connection's busy timeout makes other writers wait instead."""
        self._execute("BEGIN IMMEDIATE")
        try:
            yield
            self._execute("COMMIT")
        except BaseException:
            if self._conn is not None and self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            raise

    def _lock_process(self) -> bool:
        """Take the lock file: exclusively if no other process has the store open (then we may sweep), else
        shared. The kernel drops it when a process dies, so a kill -9 never leaves the store locked."""
        if sys.platform == "win32":
            return True  # no flock: Windows users should not point two servers at one store
        self._lock_fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # waits only while another process opens (ms)
            return False
        return True

    def _open_read_only(self) -> None:
        """Open an existing store through a read-only connection and check that this version can read its schema.
        Raises StoreError naming the folder."""
        if not (self.root / DB_NAME).is_file():
            raise StoreError(
                f"There is no image store at {self.root} (no {DB_NAME}). Pass the folder `klein-agent serve` "
                "uses (--store DIR or $KLEIN_AGENT_STORE), or start the server once to create it."
            )
        uri = read_only_uri(self.root / DB_NAME, folder_writable=os.access(self.root, os.W_OK))
        try:
            self._conn = sqlite3.connect(
                uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            applied = {v for (v,) in self._conn.execute("SELECT version FROM _migrations").fetchall()}
        except sqlite3.Error as e:
            self.close()
            raise StoreError(f"{self.root / DB_NAME} is not a readable image store database ({e}).") from e
        known = {m.version for m in MIGRATIONS}
        if applied != known:
            self.close()
            newer = bool(applied - known)
            raise StoreError(
                f"The store at {self.root} has schema version {max(applied, default=0)}; this klein-agent reads "
                f"version {max(known)}. "
                + (
                    "Upgrade klein-agent."
                    if newer
                    else "Open it once with `klein-agent serve` to upgrade it."
                )
            )

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.root / DB_NAME, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise StoreError(f"Cannot open the image store database {self.root / DB_NAME}: {e}.") from e
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning(
                    "SQLite refused WAL mode (%s) at %s; crash safety relies on rollback journaling",
                    mode,
                    self.root,
                )
            # FULL, not NORMAL: with WAL, NORMAL is already safe against application crashes (kill -9), but a
            # power loss may roll back the last commits. We promise "acknowledged means durable", and a put
            # already pays an fsync for its PNG, so one more for the WAL costs little.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # fails fast on a non-database file
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(
                f"{self.root / DB_NAME} is not a usable image store database ({e}): move the folder aside, "
                "or use another one."
            ) from e
        return conn

    def _migrate(self) -> None:
        """Apply the schema steps that this database lacks, all in one transaction, each exactly once."""
        with self._locked(), self._transaction():
            self._execute(
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            applied = {v for (v,) in self._execute("SELECT version FROM _migrations").fetchall()}
            known = {m.version for m in MIGRATIONS}
            if applied - known:
                raise StoreError(
                    f"The store at {self.root} has schema version {max(applied)}, newer than this klein-agent "
                    f"understands ({max(known)}). Upgrade klein-agent, or use another store folder."
                )
            for migration in sorted(MIGRATIONS, key=lambda m: m.version):
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    self._execute(statement)
                self._execute(
                    "INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                log.debug("image store: applied schema migration %d (%s)", migration.version, migration.name)

    def _sweep(self, min_age_s: float) -> None:
        """Repair what a crash can leave: rows whose file is missing, not a regular file or of the wrong size
        (dropped), and files with no row or leftover temp files (deleted).

        With min_age_s > 0 (another process has the store open and may be between its rename and its commit)
        only files older than that are deleted. Rows without a file are never a transient state, so they are
        always dropped. Symlinks are unlinked, never followed.
        """
        with self._locked():
            rows = self._execute("SELECT image_id, size_bytes FROM images").fetchall()
            keep: set[str] = set()
            broken: builtins.list[str] = []
            for image_id, size_bytes in rows:
                path = self._path_for(image_id)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    broken.append(image_id)
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size == size_bytes:
                    keep.add(path.name)
                else:
                    broken.append(image_id)
            if broken:
                with self._transaction():
                    for image_id in broken:
                        self._execute("DELETE FROM images WHERE image_id = ?", (image_id,))
                log.warning(
                    "image store: dropped %d record(s) whose file was missing or damaged", len(broken)
                )
        removed = 0
        now = time.time()
        with os.scandir(self._images) as entries:
            for entry in entries:
                if entry.name in keep:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    log.warning("image store: ignoring unexpected directory %s", entry.path)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if min_age_s > 0 and now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                        continue
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        log.warning("image store: cannot remove stray file %s: %s", entry.path, e)
        if removed:
            log.info("image store: removed %d orphan or temporary file(s)", removed)

    def _write_file(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` atomically and durably (`files.write_atomically`); StoreWriteError on failure,
        with nothing left behind."""
        try:
            write_atomically(path, data, tmp_prefix=_TMP_PREFIX)
        except OSError as e:
            raise StoreWriteError(_write_error_message(e, self._images)) from e

    def _insert_locked(
        self,
        image_id: str,
        width: int,
        height: int,
        size_bytes: int,
        session: str | None,
        parents: tuple[str, ...],
        recipe_json: str,
        content_key: str | None = None,
    ) -> tuple[float, builtins.list[str]]:
        """Insert the row and evict, in one transaction. Returns (created_at, evicted)."""
        with self._transaction():
            now = time.time()
            self._execute(
                "INSERT INTO images (image_id, width, height, size_bytes, created_at, last_used_at, use_seq,"
                " session, parents, recipe, content_key) VALUES (?, ?, ?, ?, ?, ?,"
                " (SELECT COALESCE(MAX(use_seq), 0) + 1 FROM images), ?, ?, ?, ?)",
                (
                    image_id,
                    width,
                    height,
                    size_bytes,
                    now,
                    now,
                    session,
                    json.dumps(list(parents)),
                    recipe_json,
                    content_key,
                ),
            )
            evicted = self._evict_locked(keep=image_id)
        return now, evicted

    def _evict_locked(self, keep: str | None) -> builtins.list[str]:
        """Delete least-recently-used rows until both bounds hold, skipping leased images (any process's unexpired
        lease: `leases.UNLEASED`) and `keep`. The caller holds an open write transaction (BEGIN IMMEDIATE), so no
        lease can be committed between this choice and the delete; it unlinks the returned ids' files after the
        commit. Raises StoreFullError if the protected images alone break a bound."""
        count, total = self._execute("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM images").fetchone()
        if count <= self.max_images and total <= self.max_bytes:
            return []
        evicted: builtins.list[str] = []
        cursor = self._execute(
            f"SELECT image_id, size_bytes FROM images WHERE {leases.UNLEASED} ORDER BY use_seq ASC, seq ASC",
            (self._clock(),),
        )
        for image_id, size_bytes in cursor:
            if count <= self.max_images and total <= self.max_bytes:
                break
            if image_id != keep:
                evicted.append(image_id)
                count -= 1
                total -= size_bytes
        cursor.close()
        if count > self.max_images or total > self.max_bytes:
            raise StoreFullError(
                f"The store is full: the images in use by running calls fill the quota ({self.max_images} "
                f"images, {self.max_bytes} bytes), so nothing can be evicted to make room. Retry when those "
                "calls finish, or raise the store quota."
            )
        for image_id in evicted:
            self._execute("DELETE FROM images WHERE image_id = ?", (image_id,))
        return evicted

    def _committed(self, image_id: str) -> bool | None:
        """After a failed insert: is the row there? None when that cannot be known."""
        try:
            with self._locked():
                if self._conn is None or self._conn.in_transaction:
                    return None
                return (
                    self._execute("SELECT 1 FROM images WHERE image_id = ?", (image_id,)).fetchone()
                    is not None
                )
        except Exception:
            return None

    def _stored_locked(self, image_id: str) -> bool:
        return self._execute("SELECT 1 FROM images WHERE image_id = ?", (image_id,)).fetchone() is not None

    def _select_locked(self, image_id: str) -> StoredImage:
        if not self.is_valid_id(image_id):
            raise UnknownImageError(image_id)
        row = self._execute(f"SELECT {_COLUMNS} FROM images WHERE image_id = ?", (image_id,)).fetchone()
        if row is None:
            raise UnknownImageError(image_id)
        return self._image_from_row(row)

    def _touch_locked(self, image_id: str) -> None:
        """Mark a use for the LRU (not for a read-only store). Best effort: a read must not fail because the disk
        is full."""
        if self.read_only:
            return
        try:
            self._execute(
                "UPDATE images SET last_used_at = ?, use_seq = (SELECT MAX(use_seq) + 1 FROM images)"
                " WHERE image_id = ?",
                (time.time(), image_id),
            )
        except sqlite3.Error as e:
            log.warning("image store: could not record a use of %s: %s", image_id, e)

    def _image_from_row(self, row: Sequence[Any]) -> StoredImage:
        image_id, width, height, size_bytes, created_at, session, parents, recipe = row
        return StoredImage(
            image_id,
            width,
            height,
            size_bytes,
            created_at,
            session,
            _read_parents(image_id, parents),
            _read_recipe(image_id, recipe),
            self._path_for(image_id),
        )

    def _path_for(self, image_id: str) -> Path:
        """File name from the (validated) id alone. Hashed, because case-insensitive file systems (macOS,
        Windows) would merge base64 ids that differ only in case; hex has one case and no leading '-'."""
        assert _ID_RE.fullmatch(image_id), "ids are validated before any filesystem use"
        return self._images / (hashlib.sha256(image_id.encode("ascii")).hexdigest() + ".png")

    def _unlink_files(self, image_ids: Iterable[str]) -> None:
        for image_id in image_ids:
            unlink_quietly(self._path_for(image_id))  # a failure leaves an orphan, which the sweep removes


class Lease:
    """The images one call uses, held against eviction by every process on the store until `release` (or the
    end of a `with` block), renewed meanwhile by the store's thread (`leases` has the invariant). One holder token;
    ids are added as the call learns them. Not for sharing between calls: each call takes its own."""

    def __init__(self, store: ImageStore, holder: str) -> None:
        self.store = store
        self.holder = holder

    def add(self, image_ids: Iterable[str], *, require_stored: bool = True) -> None:
        """Lease more ids (`ImageStore.take_leases`): stored ones, or with `require_stored=False` also ids about
        to be stored. Raises UnknownImageError (adding none) for an id that is not stored when it must be."""
        self.store.take_leases(self.holder, image_ids, require_stored=require_stored)

    def read_png(self, image_id: str) -> bytes:
        """Lease a stored image, then read its PNG: the lookup a call decodes its inputs with, so an input is
        protected before its bytes are read. Raises UnknownImageError."""
        self.add([image_id])
        return self.store.read_png(image_id)

    def find_content(self, content_key: str) -> StoredImage | None:
        """`ImageStore.find_content`, the image found leased; None also when it was evicted before the lease."""
        found = self.store.find_content(content_key)
        if found is None:
            return None
        try:
            self.add([found.image_id])
        except UnknownImageError:
            return None
        return found

    def release(self) -> None:
        """End the lease (idempotent, best effort: see `ImageStore.release_leases`)."""
        self.store.release_leases(self.holder)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _write_error_message(exc: BaseException, where: Path) -> str:
    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    full = (isinstance(exc, OSError) and exc.errno in codes) or (
        isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()
    )
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    hint = "Free disk space or lower the store quota." if full else "Check that the folder is writable."
    return f"Could not save the image in {where}: {reason}. The store is unchanged. {hint}"


def _check_png(png: bytes, width: int, height: int) -> bytes:
    """Bytes in, bytes out: no decoding here, just enough of the header to catch a mix-up of arguments."""
    if not isinstance(png, (bytes, bytearray, memoryview)):
        raise TypeError(f"png must be bytes, got {type(png).__name__}")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 2**31 - 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    data = bytes(png)
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("png is not a PNG file (bad signature or header)")
    header_size = struct.unpack(">II", data[16:24])
    if header_size != (width, height):
        raise ValueError(
            f"width x height {width}x{height} do not match the PNG's {header_size[0]}x{header_size[1]}"
        )
    return data


def _recipe_json(recipe: dict[str, Any]) -> str:
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe must be a dict, got {type(recipe).__name__}")
    try:
        text = json.dumps(recipe, allow_nan=False, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"recipe must be JSON-serialisable (str keys; str, number, bool, None, list, dict): {e}"
        ) from e
    if len(text) > MAX_RECIPE_BYTES:
        raise ValueError(f"recipe is {len(text)} bytes as JSON; the limit is {MAX_RECIPE_BYTES}")
    return text


_JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}
_JSON_KINDS[type(None)] = "null"


def _read_recipe(image_id: str, text: object) -> dict[str, Any]:
    """A row's recipe; a damaged one (not a JSON object: edited by hand, a disk error) is logged and read as
    `{"tool": "unknown", UNREADABLE_RECIPE: why}`, so one bad row never breaks a listing of all the others."""
    try:
        recipe = json.loads(text) if isinstance(text, (str, bytes)) else None
    except (ValueError, RecursionError) as exc:
        why = f"the stored recipe is not valid JSON ({describe(exc)[:80]})"
    else:
        if isinstance(recipe, dict):
            return recipe
        why = f"the stored recipe is {_JSON_KINDS.get(type(recipe), 'not readable')}, not a JSON object"
    log.warning("image %s: %s; it is listed with its recipe marked unreadable", image_id, why)
    return {"tool": "unknown", UNREADABLE_RECIPE: why}


def _read_parents(image_id: str, text: object) -> tuple[str, ...]:
    """A row's parent ids; a damaged list is logged and read as no parents (as `_read_recipe`)."""
    try:
        parents = json.loads(text) if isinstance(text, (str, bytes)) else None
    except (ValueError, RecursionError):
        parents = None
    if isinstance(parents, list) and all(isinstance(p, str) for p in parents):
        return tuple(parents)
    log.warning("image %s: the stored parent list is damaged; it is listed without parents", image_id)
    return ()


def _encode_cursor(before_seq: int, session: str | None) -> str:
    raw = json.dumps({"v": 1, "before": before_seq, "session": session}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("ascii")).rstrip(b"=").decode("ascii")


def _decode_cursor(cursor: str, session: str | None) -> int:
    shown = cursor[:40] + "..." if isinstance(cursor, str) and len(cursor) > 40 else cursor
    bad = ValueError(
        f"Invalid cursor {shown!r}. Pass next_cursor from the previous list_images result unchanged, "
        "or omit cursor to start from the newest image."
    )
    if not isinstance(cursor, str) or _CURSOR_RE.fullmatch(cursor) is None:
        raise bad
    try:
        obj = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(obj, dict) or obj.get("v") != 1 or set(obj) != {"v", "before", "session"}:
        raise bad
    before = obj["before"]
    if not isinstance(before, int) or isinstance(before, bool) or not 1 <= before <= _MAX_SQLITE_INTEGER:
        raise bad  # a number SQLite cannot hold would raise OverflowError deep in the query
    if obj["session"] != session:
        raise ValueError(
            f"This cursor belongs to a listing with session={obj['session']!r}, not {session!r}. "
            "Pass the same session as the call that returned the cursor, or omit cursor."
        )
    return before
