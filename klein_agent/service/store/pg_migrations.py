"""The PostgreSQL catalog's schema, as numbered functions: append-only, each applied once, in order.

Like migrations.py (SQLite), but the versions live in `schema_version` and the whole run holds
`pg_advisory_xact_lock(MIGRATION_LOCK)`: two processes opening a new database at once serialise on that lock, and
the second finds every version recorded and applies nothing. DDL is transactional in PostgreSQL, so a migration that
fails leaves no trace. Never edit a published migration; add the next number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from klein_agent.service.store.migrations import Execute, Migration, SchemaError

log = logging.getLogger(__name__)

# Advisory lock keys (64-bit, per database): one for migrations, one for eviction, one for "who has it open", one
# for verdict writes.
MIGRATION_LOCK = 0x6B6C_6569_6E00_0001
EVICTION_LOCK = 0x6B6C_6569_6E00_0002
OPEN_LOCK = 0x6B6C_6569_6E00_0003
VERDICT_LOCK = 0x6B6C_6569_6E00_0004  # verdict writes, one at a time: their seqs commit in order


def m001_images(execute: Execute) -> None:
    """Images (text ids; created_at from clock_timestamp(), since now() is fixed within a transaction), their
    lineage as rows, the LRU clock as a sequence, leases as rows, and a nullable unique call_id for retries."""
    execute("CREATE SEQUENCE image_uses", ())
    execute(
        """CREATE TABLE images (
            image_id     text        PRIMARY KEY,
            width        integer     NOT NULL,
            height       integer     NOT NULL,
            size_bytes   bigint      NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            use_seq      bigint      NOT NULL DEFAULT nextval('image_uses'),  -- logical LRU clock
            session      text,
            parents      text[]      NOT NULL,  -- in put() order; a parent may be gone (lineage keeps its id)
            recipe       text        NOT NULL,  -- JSON object, kept as written
            content_key  text,
            call_id      text        UNIQUE     -- a client's idempotency key (NULLs never collide)
        )""",
        (),
    )
    execute("CREATE INDEX images_by_time ON images (created_at, image_id)", ())
    execute("CREATE INDEX images_by_session ON images (session, created_at, image_id)", ())
    execute("CREATE INDEX images_by_use ON images (use_seq)", ())
    execute("CREATE INDEX images_by_content ON images (content_key)", ())
    execute(
        """CREATE TABLE lineage (
            child  text    NOT NULL REFERENCES images ON DELETE CASCADE,
            pos    integer NOT NULL,
            parent text    NOT NULL,  -- no foreign key: parents may be evicted, their ids stay
            PRIMARY KEY (child, pos)
        )""",
        (),
    )
    execute("CREATE INDEX lineage_by_parent ON lineage (parent)", ())
    execute(
        """CREATE TABLE leases (
            image_id   text             NOT NULL,  -- no foreign key: a lease may wait for an image not stored yet
            holder     text             NOT NULL,
            expires_at double precision NOT NULL,  -- Unix time on the lease clock
            PRIMARY KEY (image_id, holder)
        )""",
        (),
    )
    execute("CREATE INDEX leases_by_holder ON leases (holder)", ())


def m002_verdicts(execute: Execute) -> None:
    """Verdicts: pick, reject or note on an image, with a reason; the latest pick or reject is its standing. The
    foreign key's ON DELETE CASCADE removes them in whatever transaction removes their image (delete, eviction,
    any later path), so no verdict outlives its image and a new image never inherits one."""
    execute(
        """CREATE TABLE verdicts (
            seq      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- recording order: the latest wins
            image_id text        NOT NULL REFERENCES images ON DELETE CASCADE,
            verdict  text        NOT NULL CHECK (verdict IN ('pick', 'reject', 'note')),
            reason   text        NOT NULL,
            at       timestamptz NOT NULL DEFAULT clock_timestamp()  -- the catalog's clock, as created_at
        )""",
        (),
    )
    execute("CREATE INDEX verdicts_by_image ON verdicts (image_id, seq)", ())


MIGRATIONS: list[Migration] = [
    Migration(1, "images, lineage, leases, call ids", m001_images),
    Migration(2, "verdicts: pick, reject or note on an image", m002_verdicts),
]


def applied_versions(execute: Execute) -> set[int]:
    """The versions recorded in `schema_version` (empty when the table does not exist yet)."""
    exists = execute("SELECT to_regclass('schema_version') IS NOT NULL", ()).fetchone()[0]
    if not exists:
        return set()
    return {v for (v,) in execute("SELECT version FROM schema_version", ()).fetchall()}


def migrate(execute: Execute, migrations: Sequence[Migration] | None = None) -> list[int]:
    """Apply the migrations this database lacks, once each, under the migration lock; the caller holds one
    transaction. Returns the versions applied. Raises SchemaError if the database is newer than `migrations`."""
    steps = MIGRATIONS if migrations is None else migrations
    execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, name text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT clock_timestamp())",
        (),
    )
    applied = applied_versions(execute)
    known = {m.version for m in steps}
    if applied - known:
        raise SchemaError(applied, known)
    done: list[int] = []
    for migration in sorted(steps, key=lambda m: m.version):
        if migration.version in applied:
            continue
        migration.apply(execute)
        params: tuple[Any, ...] = (migration.version, migration.name)
        execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", params)
        log.debug("image store: applied PostgreSQL migration %d (%s)", migration.version, migration.name)
        done.append(migration.version)
    return done
