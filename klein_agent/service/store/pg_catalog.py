"""`PostgresCatalog`: the `Catalog` (catalog.py) in a PostgreSQL database shared by many processes and hosts.

    images        one row per image (text id primary key, created_at from clock_timestamp(), call_id unique)
    lineage       (child, pos, parent): the parents as rows, written in the insert's transaction
    leases        (image_id, holder, expires_at): pins that hold across every front-end
    verdicts      (seq, image_id, verdict, reason, at): pick, reject, note; removed with their image (ON DELETE
                  CASCADE, so in the transaction of the delete or eviction)
    schema_version  the migrations applied (pg_migrations.py)

Imported only when a `postgresql://` store is chosen (psycopg 3 and psycopg_pool come with the `scale` extra).

Concurrency, in words (every point is a test in tests/test_store_postgres.py):
- Writes go through a small pool of autocommit connections; each method is one explicit transaction. Reads are
  one statement each, without a transaction block (one round trip).
- Eviction runs under `pg_advisory_xact_lock(EVICTION_LOCK)`, so concurrent inserts never over- or under-evict,
  and picks victims with `FOR UPDATE SKIP LOCKED` among rows with no live lease. A lease locks its image row
  `FOR KEY SHARE` first, so the two are ordered: a row being leased is skipped, and a lease that comes after the
  victim was locked waits, then finds it gone (UnknownImageError). The delete re-checks the leases in a fresh
  statement (a fresh snapshot), so a lease committed between the choice and the lock still protects its image.
- Open: a session-level advisory lock plays the SQLite catalog's lock file: the opener that gets it exclusively
  sweeps eagerly, then downgrades to shared in `open_done`. The server drops it when a process dies.
- `pg_notify('klein_images', image_id)` runs inside the transaction that inserts a row or records a verdict on
  it: listeners hear committed changes only (pg_feed.py).
- Verdict writes hold `pg_advisory_xact_lock(VERDICT_LOCK)`, so their `seq` values commit in order: the live
  feed's verdict mark (`verdict_mark`, `verdict_changes`) never skips a record committed late.

Secrets: the DSN's password never appears in `location`, a log line or an error (dsn.scrub / redact_dsn).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg_pool

from klein_agent.service.store import pg_migrations
from klein_agent.service.store.dsn import dsn_secrets, redact_dsn, scrub
from klein_agent.service.store.migrations import SchemaError
from klein_agent.service.store.pg_eviction import evict_unleased, one_row
from klein_agent.service.store.pg_feed import CHANNEL, PostgresFeed
from klein_agent.service.store.records import (
    CallStoredError,
    LeaseRow,
    NewImage,
    SessionSummary,
    StoredImage,
    StoreError,
    StoreWriteError,
    UnknownImageError,
    VerdictRecord,
    Verdicts,
    blob_key,
    is_valid_id,
    read_recipe,
)

log = logging.getLogger(__name__)

_COLUMNS = (
    "image_id, width, height, size_bytes, extract(epoch FROM created_at)::float8, session, parents, recipe"
)
_POSITION = "(extract(epoch FROM created_at) * 1000000)::bigint"  # exact: extract() is numeric since PG 14
# An image's standing verdict: its latest pick or reject (notes never change it).
_STANDING = (
    "(SELECT v.verdict FROM verdicts v WHERE v.image_id = images.image_id AND v.verdict <> 'note'"
    " ORDER BY v.seq DESC LIMIT 1)"
)
_MAX_POSITION_US = 2**53  # positions go through float8 in the page query; exact below this
CONNECT_TIMEOUT_S = 10


class PostgresCatalog:
    """The catalog in the database `dsn` names (created schema on first open unless `read_only`). Raises
    StoreError naming the (redacted) DSN and what to do: unreachable, refused, a schema newer than this code, no
    store there (read-only)."""

    def __init__(self, dsn: str, *, read_only: bool = False, pool_size: int = 4) -> None:
        self._dsn = dsn
        self._secrets = dsn_secrets(dsn)
        self.location = redact_dsn(dsn)
        self.read_only = read_only
        self.exclusive = False
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self._session: psycopg.Connection[Any] | None = None  # holds the open lock for this catalog's life
        self._pool: psycopg_pool.ConnectionPool | None = None
        try:
            self._session = self._connect()
            if read_only:
                self._check_schema()
            else:
                self.exclusive = bool(
                    self._one("SELECT pg_try_advisory_lock(%s)", (pg_migrations.OPEN_LOCK,))
                )
                if not self.exclusive:  # waits only while another process opens (ms)
                    self._one("SELECT pg_advisory_lock_shared(%s)", (pg_migrations.OPEN_LOCK,))
                self._migrate()
            self._pool = psycopg_pool.ConnectionPool(
                dsn,
                min_size=1,
                max_size=pool_size,
                open=False,
                timeout=30.0,
                kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
                # one round trip per borrow, so a connection the server dropped (a restart, a failover) is
                # replaced before a call uses it instead of failing that call
                check=psycopg_pool.ConnectionPool.check_connection,
                name="klein-catalog",
            )
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as e:
            self.close()
            raise StoreError(f"Cannot use the image catalog {self.location}: {self._scrub(e)}.") from None
        except psycopg_pool.PoolTimeout as e:
            self.close()
            raise StoreError(
                f"Cannot connect to the image catalog {self.location}: {self._scrub(e)}."
            ) from None
        except BaseException:
            self.close()
            raise

    # ---- the Catalog protocol ---------------------------------------------------------------------------

    def open_done(self) -> None:
        """Downgrade the exclusive open lock to shared: other processes may now open the store."""
        if self.exclusive and self._session is not None:
            with self._lock:
                self._one("SELECT pg_advisory_lock_shared(%s)", (pg_migrations.OPEN_LOCK,))
                self._one("SELECT pg_advisory_unlock(%s)", (pg_migrations.OPEN_LOCK,))

    def schema_versions(self) -> list[int]:
        """The applied migration versions, ascending."""
        with self._read() as cur:  # two statements; a migration committed between them only adds a version
            return sorted(pg_migrations.applied_versions(_executor(cur)))

    def insert(
        self, image: NewImage, *, max_images: int, max_bytes: int, now: float
    ) -> tuple[float, list[str]]:
        """Row, lineage, NOTIFY and eviction in one transaction (see `Catalog.insert`)."""
        with self._write() as cur:
            inserted = (
                cur.execute(
                    "INSERT INTO images (image_id, width, height, size_bytes, session, parents, recipe, content_key,"
                    " call_id, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
                    " COALESCE(to_timestamp(%s), clock_timestamp()))"
                    # a retry of a keyed call that another front-end stored: nothing here, CallStoredError below
                    " ON CONFLICT (call_id) DO NOTHING"
                    " RETURNING extract(epoch FROM created_at)::float8",
                    (
                        image.image_id,
                        image.width,
                        image.height,
                        image.size_bytes,
                        image.session,
                        list(image.parents),
                        image.recipe_json,
                        image.content_key,
                        image.call_id,
                        image.created_at,
                    ),
                )
            ).fetchone()
            if inserted is None:  # ON CONFLICT waited for the other insert's commit: its row is visible now
                found = cur.execute("SELECT image_id FROM images WHERE call_id = %s", (image.call_id,))
                raise CallStoredError(str(image.call_id), one_row(found)[0])  # rolls this transaction back
            (created_at,) = inserted
            if image.parents:
                cur.executemany(
                    "INSERT INTO lineage (child, pos, parent) VALUES (%s, %s, %s)",
                    [(image.image_id, pos, parent) for pos, parent in enumerate(image.parents)],
                )
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, image.image_id))
            evicted = evict_unleased(cur, max_images, max_bytes, now, keep=image.image_id)
        return created_at, evicted

    def evict(self, *, max_images: int, max_bytes: int, now: float) -> list[str]:
        """Evict unleased rows until both bounds hold (see `Catalog.evict`)."""
        with self._write() as cur:
            return evict_unleased(cur, max_images, max_bytes, now, keep=None)

    def was_inserted(self, image_id: str) -> bool | None:
        """Is the row there? None when the database cannot be asked now."""
        try:
            return bool(self.contains([image_id]))
        except Exception:
            return None

    def get(self, image_id: str) -> StoredImage | None:
        """The row, or None."""
        with self._read() as cur:
            row = cur.execute(f"SELECT {_COLUMNS} FROM images WHERE image_id = %s", (image_id,)).fetchone()
        return None if row is None else _image(row)

    def touch(self, image_id: str) -> None:
        """Record a use (not when read-only); a failure is logged."""
        if self.read_only:
            return
        try:
            with self._write() as cur:
                cur.execute(
                    "UPDATE images SET use_seq = nextval('image_uses') WHERE image_id = %s", (image_id,)
                )
        except StoreError as e:
            log.warning("image store: could not record a use of %s: %s", image_id, e)

    def contains(self, image_ids: Iterable[str]) -> set[str]:
        """The ids with a row now."""
        ids = list(image_ids)
        if not ids:
            return set()
        with self._read() as cur:
            rows = cur.execute("SELECT image_id FROM images WHERE image_id = ANY(%s)", (ids,)).fetchall()
        return {r[0] for r in rows}

    def find_calls(self, call_keys: Sequence[str]) -> dict[str, StoredImage]:
        """The rows stored under these call keys, by key."""
        with self._read() as cur:
            sql = f"SELECT call_id, {_COLUMNS} FROM images WHERE call_id = ANY(%s)"
            rows = cur.execute(sql, (list(call_keys),)).fetchall()
        return {row[0]: _image(row[1:]) for row in rows}

    def find_content(self, content_key: str) -> StoredImage | None:
        """The newest row with this content key, or None."""
        with self._read() as cur:
            row = cur.execute(
                f"SELECT {_COLUMNS} FROM images WHERE content_key = %s"
                " ORDER BY created_at DESC, image_id DESC LIMIT 1",
                (content_key,),
            ).fetchone()
        return None if row is None else _image(row)

    def page(
        self, *, session: str | None, limit: int, before: object | None, standing: str | None = None
    ) -> tuple[list[StoredImage], object | None]:
        """Keyset pagination on (created_at, image_id), newest first; a position is [microseconds, image_id],
        the same with or without the `standing` filter."""
        where: list[str] = []
        params: list[Any] = []
        if standing is not None:
            where.append(f"{_STANDING} = %s")
            params.append(standing)
        if session is not None:
            where.append("session = %s")
            params.append(session)
        if before is not None:
            assert isinstance(before, list)
            where.append("(created_at, image_id) < (timestamptz 'epoch' + %s * interval '1 microsecond', %s)")
            params += [before[0], before[1]]
        sql = f"SELECT {_POSITION}, {_COLUMNS} FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, image_id DESC LIMIT %s"
        with self._read() as cur:
            rows = cur.execute(sql, (*params, limit + 1)).fetchall()
        page = [_image(row[1:]) for row in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        return page, (None if last is None else [last[0], last[1]])

    def valid_position(self, value: object) -> bool:
        """[microseconds since 1970 (int), a well-formed id]: what `page` returns."""
        return (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], int)
            and not isinstance(value[0], bool)
            and 0 <= value[0] < _MAX_POSITION_US
            and is_valid_id(value[1])
        )

    def sessions(self) -> list[SessionSummary]:
        """Every session, the one with the newest row first."""
        with self._read() as cur:
            rows = cur.execute(
                "SELECT session, count(*), extract(epoch FROM min(created_at))::float8,"
                " extract(epoch FROM max(created_at))::float8 FROM images"
                " GROUP BY session ORDER BY max(created_at) DESC, session"
            ).fetchall()
        return [SessionSummary(session, count, first, last) for session, count, first, last in rows]

    def totals(self) -> tuple[int, int]:
        """(row count, total bytes)."""
        with self._read() as cur:
            count, total = one_row(cur.execute("SELECT count(*), COALESCE(sum(size_bytes), 0) FROM images"))
        return int(count), int(total)

    def sizes(self) -> list[tuple[str, int]]:
        """(image_id, size_bytes) of every row."""
        with self._read() as cur:
            return [(i, int(s)) for i, s in cur.execute("SELECT image_id, size_bytes FROM images").fetchall()]

    def delete(self, image_ids: Iterable[str]) -> None:
        """Delete these rows (and, by ON DELETE CASCADE, their lineage and verdict rows) in one transaction."""
        ids = list(image_ids)
        with self._write() as cur:
            cur.execute("DELETE FROM images WHERE image_id = ANY(%s)", (ids,))

    def add_verdict(self, image_id: str, verdict: str, reason: str, *, keep: int) -> VerdictRecord:
        """Check the row, record, and trim the image's history past `keep`, in one transaction (see
        `Catalog.add_verdict`). The image row is locked FOR NO KEY UPDATE first: eviction (FOR UPDATE SKIP LOCKED)
        passes it by, a delete waits for the commit, and two verdicts on one image commit in their `seq` order, so
        "latest" is the same for every front-end and the trim never races another trim."""
        with self._write() as cur:
            found = cur.execute(
                "SELECT 1 FROM images WHERE image_id = %s FOR NO KEY UPDATE", (image_id,)
            ).fetchone()
            if found is None:
                raise UnknownImageError(image_id)
            _verdict_written(cur, image_id)
            (at,) = one_row(
                cur.execute(
                    "INSERT INTO verdicts (image_id, verdict, reason) VALUES (%s, %s, %s)"
                    " RETURNING extract(epoch FROM at)::float8",
                    (image_id, verdict, reason),
                )
            )
            _trim_verdicts(cur, image_id, keep)
        return VerdictRecord(image_id, verdict, reason, at)

    def copy_verdicts(self, image_id: str, records: Sequence[VerdictRecord], *, keep: int) -> int:
        """Record a copied history in one transaction (the row locked as `add_verdict` locks it) unless the image
        has verdicts already."""
        with self._write() as cur:
            if (
                cur.execute(
                    "SELECT 1 FROM images WHERE image_id = %s FOR NO KEY UPDATE", (image_id,)
                ).fetchone()
                is None
            ):
                raise UnknownImageError(image_id)
            if cur.execute("SELECT 1 FROM verdicts WHERE image_id = %s LIMIT 1", (image_id,)).fetchone():
                return 0
            _verdict_written(cur, image_id)
            cur.executemany(  # in order: the identity column gives them their recording order
                "INSERT INTO verdicts (image_id, verdict, reason, at) VALUES (%s, %s, %s, to_timestamp(%s))",
                [(image_id, r.verdict, r.reason, r.at) for r in records],
            )
            _trim_verdicts(cur, image_id, keep)
        return len(records)

    def verdicts(self, image_ids: Iterable[str], *, notes: int) -> dict[str, Verdicts]:
        """Each image's standing and newest notes, from one read of their records (at most the kept history per
        image, so memory is bounded by the ids asked for)."""
        ids = list(dict.fromkeys(image_ids))
        if not ids:
            return {}
        found: dict[str, list[VerdictRecord]] = {}
        with self._read() as cur:
            rows = cur.execute(
                "SELECT image_id, verdict, reason, extract(epoch FROM at)::float8 FROM verdicts"
                " WHERE image_id = ANY(%s) ORDER BY seq DESC",
                (ids,),
            ).fetchall()
        for row in rows:
            found.setdefault(row[0], []).append(VerdictRecord(*row))
        return {image_id: Verdicts.of(records, notes) for image_id, records in found.items()}

    def verdict_mark(self) -> int:
        """The newest record's seq (0: none yet); verdict writes hold VERDICT_LOCK, so seqs commit in order."""
        with self._read() as cur:
            return int(one_row(cur.execute("SELECT COALESCE(max(seq), 0) FROM verdicts"))[0])

    def verdict_changes(self, after: int, *, limit: int) -> tuple[list[str], int]:
        """The images of the next `limit` records after `after`, and the mark of the last one read."""
        with self._read() as cur:
            rows = cur.execute(
                "SELECT seq, image_id FROM verdicts WHERE seq > %s ORDER BY seq LIMIT %s", (after, limit)
            ).fetchall()
        return list(dict.fromkeys(image_id for _, image_id in rows)), (rows[-1][0] if rows else after)

    def take_leases(
        self, holder: str, image_ids: Iterable[str], *, expires_at: float, require_stored: bool
    ) -> None:
        """Check (locking the rows FOR KEY SHARE, which orders this against eviction) and lease, one transaction."""
        ids = list(dict.fromkeys(image_ids))
        with self._write() as cur:
            if require_stored:
                rows = cur.execute(
                    "SELECT image_id FROM images WHERE image_id = ANY(%s) ORDER BY image_id FOR KEY SHARE",
                    (ids,),
                ).fetchall()
                found = {r[0] for r in rows}
                for image_id in ids:
                    if image_id not in found:
                        raise UnknownImageError(image_id)
            cur.executemany(
                "INSERT INTO leases (image_id, holder, expires_at) VALUES (%s, %s, %s) ON CONFLICT"
                " (image_id, holder) DO UPDATE SET expires_at = GREATEST(leases.expires_at, excluded.expires_at)",
                [(image_id, holder, expires_at) for image_id in ids],
            )

    def renew_leases(self, holders: Iterable[str], expires_at: float) -> None:
        """Move every lease of `holders` to `expires_at`."""
        with self._write() as cur:
            cur.execute(
                "UPDATE leases SET expires_at = %s WHERE holder = ANY(%s)", (expires_at, list(holders))
            )

    def release_leases(self, holder: str, now: float) -> None:
        """Delete `holder`'s leases and the expired ones."""
        with self._write() as cur:
            cur.execute("DELETE FROM leases WHERE holder = %s OR expires_at <= %s", (holder, now))

    def purge_expired_leases(self, now: float) -> None:
        """Delete the expired leases."""
        with self._write() as cur:
            cur.execute("DELETE FROM leases WHERE expires_at <= %s", (now,))

    def lease_rows(self) -> list[LeaseRow]:
        """Every lease row."""
        with self._read() as cur:
            rows = cur.execute("SELECT image_id, holder, expires_at FROM leases ORDER BY image_id, holder")
            return [LeaseRow(*row) for row in rows.fetchall()]

    def listen(self) -> PostgresFeed:
        """A feed of the ids committed from now on (LISTEN on a connection of its own)."""
        self._check_usable()
        try:
            conn = self._connect()
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as e:
            raise StoreError(
                f"Cannot listen on the image catalog {self.location}: {self._scrub(e)}."
            ) from None
        return PostgresFeed(conn, self._scrub)

    def close(self) -> None:
        """Close the pool and the session connection (releasing the open lock). Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            session, self._session = self._session, None
        if pool is not None:
            pool.close()
        if session is not None:
            session.close()

    # ---- internals ----------------------------------------------------------------------------------------

    def _scrub(self, error: BaseException | str) -> str:
        return scrub(str(error).strip(), *self._secrets)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        assert self._session is not None
        return one_row(self._session.execute(sql, params))[0]

    def _migrate(self) -> None:
        assert self._session is not None
        try:
            with self._session.transaction():
                pg_migrations.migrate(_executor(self._session.cursor()))
        except SchemaError as e:
            raise StoreError(
                f"The catalog {self.location} has schema version {e.newest}, newer than this klein-agent "
                f"understands ({e.known}). Upgrade klein-agent, or use another database."
            ) from None

    def _check_schema(self) -> None:
        assert self._session is not None
        applied = pg_migrations.applied_versions(_executor(self._session.cursor()))
        known = {m.version for m in pg_migrations.MIGRATIONS}
        if not applied:
            raise StoreError(
                f"There is no image store in {self.location}. Start `klein-agent serve --store DSN` once to "
                "create it, or check the database name."
            )
        if applied != known:
            raise StoreError(
                f"The catalog {self.location} has schema version {max(applied)}; this klein-agent reads version "
                f"{max(known)}. "
                + ("Upgrade klein-agent." if applied - known else "Open it once with serve.")
            )

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreError("The image store is closed.")
        if os.getpid() != self._pid:  # connections must not cross fork()
            raise StoreError("This ImageStore was opened before a fork; open a new one in this process.")

    @contextlib.contextmanager
    def _read(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor on an autocommit connection, for one statement, which is its own transaction with one
        snapshot (READ COMMITTED): a BEGIN ... COMMIT around it would add two round trips and no consistency."""
        self._check_usable()
        assert self._pool is not None
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise StoreError(f"Cannot read the image catalog {self.location}: {self._scrub(e)}.") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction whose database failures become StoreWriteError (nothing committed)."""
        if self.read_only:
            raise StoreError(f"The image catalog {self.location} is open read-only.")
        self._check_usable()
        assert self._pool is not None
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise StoreWriteError(
                f"Could not save in the image catalog {self.location}: {self._scrub(e)}. The store is unchanged. "
                "Check that the database server is reachable and accepts writes."
            ) from None


def _verdict_written(cur: psycopg.Cursor[Any], image_id: str) -> None:
    """Before a transaction records verdicts: take VERDICT_LOCK (held to the commit), so the identity values
    they draw commit in their order across front-ends (a reader that saw mark m never meets a later commit with
    a smaller one: `Catalog.verdict_mark`), and tell the live feed at the commit."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (pg_migrations.VERDICT_LOCK,))
    cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, image_id))


def _trim_verdicts(cur: psycopg.Cursor[Any], image_id: str, keep: int) -> None:
    """Delete the image's records beyond its newest `keep`, never its standing one (the caller's transaction)."""
    cur.execute(
        "DELETE FROM verdicts WHERE image_id = %(id)s AND seq NOT IN"
        " (SELECT seq FROM verdicts WHERE image_id = %(id)s ORDER BY seq DESC LIMIT %(keep)s)"
        " AND seq IS DISTINCT FROM (SELECT max(seq) FROM verdicts WHERE image_id = %(id)s AND verdict <> 'note')",
        {"id": image_id, "keep": max(1, keep)},
    )


def _executor(cur: psycopg.Cursor[Any]) -> Any:
    """`migrations.Execute` over a psycopg cursor: one statement with its parameters, the cursor back."""

    def execute(sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return cur.execute(sql, params or None)

    return execute


def _image(row: Sequence[Any]) -> StoredImage:
    image_id, width, height, size_bytes, created_at, session, parents, recipe = row
    return StoredImage(
        image_id,
        width,
        height,
        int(size_bytes),
        created_at,
        session,
        tuple(parents),
        read_recipe(image_id, recipe),
        blob_key(image_id) if is_valid_id(image_id) else "",
    )
