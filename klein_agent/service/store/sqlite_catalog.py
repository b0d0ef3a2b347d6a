"""`SQLiteCatalog`: the `Catalog` (catalog.py) of a local store, one SQLite database in the store's folder.

    <root>/store.sqlite3 (+ -wal, -shm)   the rows, WAL mode; never copy it while open (use VACUUM INTO)
    <root>/store.lock                     inter-process lock: the holder of the exclusive lock may sweep eagerly

Threading: one connection (check_same_thread=False) behind one re-entrant lock; statements are short. Several
processes may share the database: SQLite serialises their writes, and every write transaction is BEGIN IMMEDIATE,
so a read-then-write never fails half way with SQLITE_BUSY (the busy timeout makes other writers wait).
Opened `read_only` (the gallery beside a running server), it reads through a read-only connection: no lock, no
migration, and `touch` does nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from klein_agent.service.store import migrations
from klein_agent.service.store.records import (
    CallStoredError,
    LeaseRow,
    NewImage,
    SessionSummary,
    StoredImage,
    StoreError,
    StoreFullError,
    StoreWriteError,
    UnknownImageError,
    VerdictRecord,
    Verdicts,
    blob_key,
    folder_problem,
    is_valid_id,
    leased_full_message,
    read_parents,
    read_recipe,
    write_error_message,
)

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

DB_NAME = "store.sqlite3"
LOCK_NAME = "store.lock"
_MAX_SQLITE_INTEGER = 2**63 - 1
_COLUMNS = "image_id, width, height, size_bytes, created_at, session, parents, recipe"
# Eviction's condition: no unexpired lease (any process's) on the row; the parameter is the evicting clock.
# An image's standing verdict: its latest pick or reject (notes never change it).
_STANDING = (
    "(SELECT verdict FROM verdicts WHERE verdicts.image_id = images.image_id AND verdict != 'note'"
    " ORDER BY seq DESC LIMIT 1)"
)
_UNLEASED = (
    "NOT EXISTS (SELECT 1 FROM leases WHERE leases.image_id = images.image_id AND leases.expires_at > ?)"
)


def read_only_uri(database: Path, *, folder_writable: bool) -> str:
    """The SQLite URI that opens `database` for reading only.

    `mode=ro` alone still needs the WAL side files (-shm, -wal): SQLite creates them when missing, which fails in
    a folder that cannot be written (a read-only filesystem, a backup mounted read-only). There `immutable=1` is
    added: SQLite then reads the main file as it is, without side files or locks; what a WAL file beside it holds
    and was not yet checkpointed is not seen, and no one can be writing the store there anyway.
    """
    query = "mode=ro" if folder_writable else "mode=ro&immutable=1"
    return f"{database.as_uri()}?{query}"


class SQLiteCatalog:
    """The catalog in `root`/store.sqlite3 (root must exist unless `read_only`). Raises StoreError naming the file
    and what to do: not a database, a schema newer than this code, no store there (read-only)."""

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        import threading

        self.root = root
        self.database = root / DB_NAME
        self.location = str(self.database)
        self.read_only = read_only
        self.exclusive = False
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._closed = False
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        try:
            if read_only:
                self._open_read_only()
                return
            try:
                self.exclusive = self._lock_process()
            except OSError as e:
                raise StoreError(f"Cannot open the image store at {root}: {folder_problem(root, e)}.") from e
            self._conn = self._connect()
            with self._locked(), self._transaction():
                try:
                    migrations.migrate(self._execute)
                except migrations.SchemaError as e:
                    raise StoreError(
                        f"The store at {root} has schema version {e.newest}, newer than this klein-agent "
                        f"understands ({e.known}). Upgrade klein-agent, or use another store folder."
                    ) from None
        except BaseException:
            self.close()
            raise

    # ---- the Catalog protocol ---------------------------------------------------------------------------

    def open_done(self) -> None:
        """The open-time repair (sweep, eviction) is over: let other processes open the store."""
        if self.exclusive and sys.platform != "win32" and self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def schema_versions(self) -> list[int]:
        """The applied migration versions, ascending."""
        with self._locked():
            return sorted(migrations.applied_versions(self._execute))

    def insert(
        self, image: NewImage, *, max_images: int, max_bytes: int, now: float
    ) -> tuple[float, list[str]]:
        """Insert the row and evict, in one transaction (see `Catalog.insert`)."""
        with self._locked(), self._writing():
            if (
                image.call_id is not None
            ):  # the write lock is held: no other insert of this key can interleave
                found = self._execute(
                    "SELECT image_id FROM images WHERE call_id = ?", (image.call_id,)
                ).fetchone()
                if found is not None:
                    raise CallStoredError(image.call_id, found[0])
            created_at = time.time() if image.created_at is None else image.created_at
            self._execute(
                "INSERT INTO images (image_id, width, height, size_bytes, created_at, last_used_at, use_seq,"
                " session, parents, recipe, content_key, call_id) VALUES (?, ?, ?, ?, ?, ?,"
                " (SELECT COALESCE(MAX(use_seq), 0) + 1 FROM images), ?, ?, ?, ?, ?)",
                (
                    image.image_id,
                    image.width,
                    image.height,
                    image.size_bytes,
                    created_at,
                    created_at,
                    image.session,
                    json.dumps(list(image.parents)),
                    image.recipe_json,
                    image.content_key,
                    image.call_id,
                ),
            )
            evicted = self._evict(max_images, max_bytes, now, keep=image.image_id)
        return created_at, evicted

    def evict(self, *, max_images: int, max_bytes: int, now: float) -> list[str]:
        """Evict unleased rows until both bounds hold (see `Catalog.evict`)."""
        with self._locked(), self._writing():
            return self._evict(max_images, max_bytes, now, keep=None)

    def was_inserted(self, image_id: str) -> bool | None:
        """Is the row there? None when a transaction is still open or the read fails."""
        try:
            with self._locked():
                if self._conn is None or self._conn.in_transaction:
                    return None
                return self._has(image_id)
        except Exception:
            return None

    def get(self, image_id: str) -> StoredImage | None:
        """The row, or None."""
        with self._locked():
            row = self._execute(f"SELECT {_COLUMNS} FROM images WHERE image_id = ?", (image_id,)).fetchone()
        return None if row is None else _image(row)

    def touch(self, image_id: str) -> None:
        """Record a use (not in a read-only catalog); a failure (a full disk) is logged."""
        if self.read_only:
            return
        try:
            with self._locked():
                self._execute(
                    "UPDATE images SET last_used_at = ?, use_seq = (SELECT MAX(use_seq) + 1 FROM images)"
                    " WHERE image_id = ?",
                    (time.time(), image_id),
                )
        except sqlite3.Error as e:
            log.warning("image store: could not record a use of %s: %s", image_id, e)

    def contains(self, image_ids: Iterable[str]) -> set[str]:
        """The ids with a row now."""
        with self._locked():
            return {i for i in image_ids if self._has(i)}

    def find_content(self, content_key: str) -> StoredImage | None:
        """The newest row with this content key, or None."""
        with self._locked():
            row = self._execute(
                f"SELECT {_COLUMNS} FROM images WHERE content_key = ? ORDER BY seq DESC LIMIT 1",
                (content_key,),
            ).fetchone()
        return None if row is None else _image(row)

    def find_calls(self, call_keys: Sequence[str]) -> dict[str, StoredImage]:
        """The rows stored under these call keys, by key."""
        keys = list(call_keys)
        if not keys:
            return {}
        marks = ", ".join("?" * len(keys))
        with self._locked():
            rows = self._execute(
                f"SELECT call_id, {_COLUMNS} FROM images WHERE call_id IN ({marks})", keys
            ).fetchall()
        return {row[0]: _image(row[1:]) for row in rows}

    def page(
        self, *, session: str | None, limit: int, before: object | None, standing: str | None = None
    ) -> tuple[list[StoredImage], object | None]:
        """Keyset pagination on the insertion sequence, newest first; a position is a sequence number."""
        where: list[str] = []
        params: list[Any] = []
        if standing is not None:
            where.append(f"{_STANDING} = ?")
            params.append(standing)
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
        page = [_image(row[1:]) for row in rows[:limit]]
        return page, (rows[limit - 1][0] if len(rows) > limit else None)

    def valid_position(self, value: object) -> bool:
        """A sequence number SQLite can hold (a larger one would raise OverflowError deep in the query)."""
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_SQLITE_INTEGER

    def sessions(self) -> list[SessionSummary]:
        """Every session, the one with the newest row first."""
        with self._locked():
            rows = self._execute(
                "SELECT session, COUNT(*), MIN(created_at), MAX(created_at) FROM images"
                " GROUP BY session ORDER BY MAX(seq) DESC"
            ).fetchall()
        return [SessionSummary(session, count, first, last) for session, count, first, last in rows]

    def totals(self) -> tuple[int, int]:
        """(row count, total bytes)."""
        with self._locked():
            count, total = self._execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM images"
            ).fetchone()
        return count, total

    def sizes(self) -> list[tuple[str, int]]:
        """(image_id, size_bytes) of every row."""
        with self._locked():
            return [(i, s) for i, s in self._execute("SELECT image_id, size_bytes FROM images").fetchall()]

    def delete(self, image_ids: Iterable[str]) -> None:
        """Delete these rows and their verdicts in one transaction."""
        with self._locked(), self._writing():
            for image_id in image_ids:
                self._remove(image_id)

    def add_verdict(self, image_id: str, verdict: str, reason: str, *, keep: int) -> VerdictRecord:
        """Check the row, record, and trim the image's history past `keep`, in one transaction."""
        with self._locked(), self._writing():
            if not self._has(image_id):
                raise UnknownImageError(image_id)
            at = time.time()
            self._execute(
                "INSERT INTO verdicts (image_id, verdict, reason, at) VALUES (?, ?, ?, ?)",
                (image_id, verdict, reason, at),
            )
            self._trim_verdicts(image_id, keep)
        return VerdictRecord(image_id, verdict, reason, at)

    def copy_verdicts(self, image_id: str, records: Sequence[VerdictRecord], *, keep: int) -> int:
        """Record a copied history in one transaction unless the image has verdicts already."""
        with self._locked(), self._writing():
            if not self._has(image_id):
                raise UnknownImageError(image_id)
            if self._execute("SELECT 1 FROM verdicts WHERE image_id = ?", (image_id,)).fetchone():
                return 0
            for record in records:
                self._execute(
                    "INSERT INTO verdicts (image_id, verdict, reason, at) VALUES (?, ?, ?, ?)",
                    (image_id, record.verdict, record.reason, record.at),
                )
            self._trim_verdicts(image_id, keep)
        return len(records)

    def verdicts(self, image_ids: Iterable[str], *, notes: int) -> dict[str, Verdicts]:
        """Each image's standing and newest notes, from one read of their records."""
        ids = list(dict.fromkeys(image_ids))
        found: dict[str, list[VerdictRecord]] = {}
        with self._locked():
            for start in range(0, len(ids), 500):  # under SQLite's limit on bound parameters
                chunk = ids[start : start + 500]
                rows = self._execute(
                    "SELECT image_id, verdict, reason, at FROM verdicts WHERE image_id IN"
                    f" ({', '.join('?' * len(chunk))}) ORDER BY seq DESC",
                    chunk,
                ).fetchall()
                for row in rows:
                    found.setdefault(row[0], []).append(VerdictRecord(*row))
        return {image_id: Verdicts.of(records, notes) for image_id, records in found.items()}

    def verdict_mark(self) -> int:
        """The newest record's seq (0: none yet): AUTOINCREMENT never reuses one, and one writer at a time
        commits in seq order."""
        with self._locked():
            (mark,) = self._execute("SELECT COALESCE(MAX(seq), 0) FROM verdicts").fetchone()
        return int(mark)

    def verdict_changes(self, after: int, *, limit: int) -> tuple[list[str], int]:
        """The images of the next `limit` records after `after`, and the mark of the last one read."""
        with self._locked():
            rows = self._execute(
                "SELECT seq, image_id FROM verdicts WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return list(dict.fromkeys(image_id for _, image_id in rows)), (rows[-1][0] if rows else after)

    def take_leases(
        self, holder: str, image_ids: Iterable[str], *, expires_at: float, require_stored: bool
    ) -> None:
        """Check (if required) and lease in one transaction; a lease `holder` has already is extended."""
        ids = tuple(dict.fromkeys(image_ids))
        with self._locked(), self._writing():
            if require_stored:
                for image_id in ids:
                    if not self._has(image_id):
                        raise UnknownImageError(image_id)
            for image_id in ids:
                self._execute(
                    "INSERT INTO leases (image_id, holder, expires_at) VALUES (?, ?, ?) ON CONFLICT"
                    " (image_id, holder) DO UPDATE SET expires_at = MAX(expires_at, excluded.expires_at)",
                    (image_id, holder, expires_at),
                )

    def renew_leases(self, holders: Iterable[str], expires_at: float) -> None:
        """Move every lease of `holders` to `expires_at`."""
        with self._locked(), self._writing():
            for holder in holders:
                self._execute("UPDATE leases SET expires_at = ? WHERE holder = ?", (expires_at, holder))

    def release_leases(self, holder: str, now: float) -> None:
        """Delete `holder`'s leases and the expired ones."""
        with self._locked(), self._writing():
            self._execute("DELETE FROM leases WHERE holder = ? OR expires_at <= ?", (holder, now))

    def purge_expired_leases(self, now: float) -> None:
        """Delete the expired leases."""
        with self._locked(), self._writing():
            self._execute("DELETE FROM leases WHERE expires_at <= ?", (now,))

    def listen(self) -> None:
        """No push here: the gallery polls `page(limit=1)` and `totals()` (see `Catalog.listen`)."""
        return None

    def lease_rows(self) -> list[LeaseRow]:
        """Every lease row."""
        with self._locked():
            rows = self._execute("SELECT image_id, holder, expires_at FROM leases ORDER BY image_id, holder")
            return [LeaseRow(*row) for row in rows.fetchall()]

    def close(self) -> None:
        """Close the connection and release the lock file. Idempotent."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    # ---- internals ----------------------------------------------------------------------------------------

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Every statement goes through here: the one seam that fault-injection tests patch."""
        assert self._conn is not None
        return self._conn.execute(sql, params)

    def _remove(self, image_id: str) -> None:
        """Delete one row and its verdicts, inside the caller's write transaction."""
        self._execute("DELETE FROM images WHERE image_id = ?", (image_id,))
        self._execute("DELETE FROM verdicts WHERE image_id = ?", (image_id,))

    def _trim_verdicts(self, image_id: str, keep: int) -> None:
        """Delete the image's records beyond its newest `keep`, never its standing one (the caller's transaction)."""
        self._execute(
            "DELETE FROM verdicts WHERE image_id = ?1 AND seq NOT IN"
            " (SELECT seq FROM verdicts WHERE image_id = ?1 ORDER BY seq DESC LIMIT ?2)"
            " AND seq IS NOT (SELECT MAX(seq) FROM verdicts WHERE image_id = ?1 AND verdict != 'note')",
            (image_id, max(1, keep)),
        )

    def _has(self, image_id: str) -> bool:
        return self._execute("SELECT 1 FROM images WHERE image_id = ?", (image_id,)).fetchone() is not None

    def _evict(self, max_images: int, max_bytes: int, now: float, keep: str | None) -> list[str]:
        """Delete least-recently-used unleased rows (never `keep`) until both bounds hold, inside the caller's
        write transaction, so no lease can be committed between this choice and the delete."""
        count, total = self._execute("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM images").fetchone()
        if count <= max_images and total <= max_bytes:
            return []
        evicted: list[str] = []
        cursor = self._execute(
            f"SELECT image_id, size_bytes FROM images WHERE {_UNLEASED} ORDER BY use_seq ASC, seq ASC", (now,)
        )
        for image_id, size_bytes in cursor:
            if count <= max_images and total <= max_bytes:
                break
            if image_id != keep:
                evicted.append(image_id)
                count -= 1
                total -= size_bytes
        cursor.close()
        if count > max_images or total > max_bytes:
            raise StoreFullError(leased_full_message(max_images, max_bytes))
        for image_id in evicted:
            self._remove(image_id)
        return evicted

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
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        if self.read_only:
            raise StoreError(f"The image store database {self.database} is open read-only.")
        self._execute("BEGIN IMMEDIATE")
        try:
            yield
            self._execute("COMMIT")
        except BaseException:
            if self._conn is not None and self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A transaction whose I/O failures (a full disk, a locked database) become StoreWriteError."""
        try:
            with self._transaction():
                yield
        except (sqlite3.Error, OSError) as exc:
            full = "full" in str(exc).lower() or (isinstance(exc, OSError) and "No space" in str(exc))
            raise StoreWriteError(write_error_message(exc, self.root, full=full or None)) from exc

    def _lock_process(self) -> bool:
        """Take the lock file: exclusively if no other process has the store open, else shared. The kernel drops
        it when a process dies, so a kill -9 never leaves the store locked."""
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
        """Open an existing database read-only and check that this version can read its schema."""
        if not self.database.is_file():
            raise StoreError(
                f"There is no image store at {self.root} (no {DB_NAME}). Pass the folder `klein-agent serve` "
                "uses (--store DIR or $KLEIN_AGENT_STORE), or start the server once to create it."
            )
        uri = read_only_uri(self.database, folder_writable=os.access(self.root, os.W_OK))
        try:
            self._conn = sqlite3.connect(
                uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            applied = migrations.applied_versions(self._execute)
        except sqlite3.Error as e:
            raise StoreError(f"{self.database} is not a readable image store database ({e}).") from e
        known = {m.version for m in migrations.MIGRATIONS}
        if applied != known:
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
            conn = sqlite3.connect(self.database, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"Cannot open the image store database {self.database}: {e}.") from e
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
                f"{self.database} is not a usable image store database ({e}): move the folder aside, "
                "or use another one."
            ) from e
        return conn


def _image(row: Sequence[Any]) -> StoredImage:
    image_id, width, height, size_bytes, created_at, session, parents, recipe = row
    return StoredImage(
        image_id,
        width,
        height,
        size_bytes,
        created_at,
        session,
        read_parents(image_id, parents),
        read_recipe(image_id, recipe),
        blob_key(image_id) if is_valid_id(image_id) else "",
    )
