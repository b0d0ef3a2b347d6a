"""The SQLite catalog's schema, as numbered functions: append-only, each applied once, in order.

A migration is a function of `execute` (one SQL statement with its parameters) that runs inside the transaction
that records its version in `_migrations`; `migrate` applies, in one BEGIN IMMEDIATE transaction, the ones a
database lacks. Two processes opening a new store at once therefore serialise on SQLite's write lock: the second
finds the versions recorded and applies nothing. Never edit a published migration; add the next number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Execute = Callable[[str, Sequence[Any]], Any]


@dataclass(frozen=True)
class Migration:
    """One schema step: `apply(execute)` runs once, in version order, recorded in `_migrations`."""

    version: int
    name: str
    apply: Callable[[Execute], None]


def m001_images(execute: Execute) -> None:
    """The images table: one row per stored image, its lineage and recipe as JSON, a logical LRU clock."""
    execute(
        """CREATE TABLE images (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: listings are newest first
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
        (),
    )
    execute("CREATE INDEX images_by_use ON images(use_seq)", ())
    execute("CREATE INDEX images_by_session ON images(session, seq)", ())


def m002_content_keys(execute: Execute) -> None:
    """Content keys: an input imported twice is stored once."""
    execute("ALTER TABLE images ADD COLUMN content_key TEXT", ())
    execute("CREATE INDEX images_by_content ON images(content_key)", ())


def m003_leases(execute: Execute) -> None:
    """Leases: pins that hold across processes (`leases.py` has the invariant)."""
    execute(
        """CREATE TABLE leases (
            image_id   TEXT NOT NULL,  -- no foreign key: a lease may wait for an image not stored yet
            holder     TEXT NOT NULL,  -- one lease's random token
            expires_at REAL NOT NULL,  -- Unix time; renewed while the holder lives
            PRIMARY KEY (image_id, holder)
        )""",
        (),
    )
    execute("CREATE INDEX leases_by_holder ON leases(holder)", ())


def m004_verdicts(execute: Execute) -> None:
    """Verdicts: pick, reject or note on an image, with a reason; the latest pick or reject is its standing."""
    execute(
        """CREATE TABLE verdicts (
            seq      INTEGER PRIMARY KEY AUTOINCREMENT,  -- recording order: the latest pick or reject wins
            image_id TEXT    NOT NULL,  -- no foreign key: delete and eviction remove them in the image's transaction
            verdict  TEXT    NOT NULL CHECK (verdict IN ('pick', 'reject', 'note')),
            reason   TEXT    NOT NULL,
            at       REAL    NOT NULL   -- Unix time
        )""",
        (),
    )
    execute("CREATE INDEX verdicts_by_image ON verdicts(image_id, seq)", ())


def m005_call_keys(execute: Execute) -> None:
    """Call keys: picture k of a call retried with the same idempotency key is stored once (NULLs never collide)."""
    execute("ALTER TABLE images ADD COLUMN call_id TEXT", ())
    execute("CREATE UNIQUE INDEX images_by_call ON images(call_id)", ())


MIGRATIONS: list[Migration] = [
    Migration(1, "images table", m001_images),
    Migration(2, "content keys: an input imported twice is stored once", m002_content_keys),
    Migration(3, "leases: pins that hold across processes", m003_leases),
    Migration(4, "verdicts: pick, reject or note on an image", m004_verdicts),
    Migration(5, "call keys: a retried call stores each picture once", m005_call_keys),
]


class SchemaError(Exception):
    """The database has versions this code does not know (a newer klein-agent wrote it)."""

    def __init__(self, applied: set[int], known: set[int]) -> None:
        self.newest, self.known = max(applied), max(known)
        super().__init__(
            f"schema version {self.newest}, newer than this klein-agent understands ({self.known})"
        )


def applied_versions(execute: Execute) -> set[int]:
    """The versions recorded in `_migrations` (the table must exist)."""
    return {v for (v,) in execute("SELECT version FROM _migrations", ()).fetchall()}


def migrate(execute: Execute, migrations: Sequence[Migration] | None = None) -> list[int]:
    """Apply the migrations this database lacks, each exactly once, and return their versions. The caller holds a
    write transaction (BEGIN IMMEDIATE). Raises SchemaError if the database is newer than `migrations`."""
    steps = MIGRATIONS if migrations is None else migrations
    execute(
        "CREATE TABLE IF NOT EXISTS _migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)",
        (),
    )
    applied = applied_versions(execute)
    known = {m.version for m in steps}
    if applied - known:
        raise SchemaError(applied, known)
    done = []
    for migration in sorted(steps, key=lambda m: m.version):
        if migration.version in applied:
            continue
        migration.apply(execute)
        execute(
            "INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, time.time()),
        )
        log.debug("image store: applied schema migration %d (%s)", migration.version, migration.name)
        done.append(migration.version)
    return done
