"""Eviction in a PostgreSQL catalog: least-recently-used rows without a live lease, deleted inside the caller's
transaction under `pg_advisory_xact_lock(EVICTION_LOCK)` (pg_catalog.py says how it orders against leases)."""

from __future__ import annotations

from typing import Any

import psycopg

from klein_agent.service.store import pg_migrations
from klein_agent.service.store.records import StoreError, StoreFullError, leased_full_message

# A row is unleased when no lease on it expires after `now` (the one %s parameter).
UNLEASED = "NOT EXISTS (SELECT 1 FROM leases l WHERE l.image_id = images.image_id AND l.expires_at > %s)"
EVICT_BATCH = 256  # victims locked per round: bounded memory and lock footprint, whatever the store's size


def evict_unleased(
    cur: psycopg.Cursor[Any], max_images: int, max_bytes: int, now: float, keep: str | None
) -> list[str]:
    """Delete least-recently-used unleased rows (never `keep`) until both bounds hold, inside the caller's
    transaction and under the eviction lock (held to commit)."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (pg_migrations.EVICTION_LOCK,))
    evicted: list[str] = []
    refused: list[str] = [keep] if keep else []  # rows a lease protected at the re-check
    while True:
        count, total = one_row(cur.execute("SELECT count(*), COALESCE(sum(size_bytes), 0) FROM images"))
        if count <= max_images and total <= max_bytes:
            return evicted
        candidates = cur.execute(
            f"SELECT image_id, size_bytes FROM images WHERE image_id <> ALL(%s) AND {UNLEASED}"
            " ORDER BY use_seq LIMIT %s FOR UPDATE SKIP LOCKED",
            (refused, now, EVICT_BATCH),
        ).fetchall()
        if not candidates:
            raise StoreFullError(leased_full_message(max_images, max_bytes))
        chosen: list[str] = []
        for image_id, size_bytes in candidates:
            if count <= max_images and total <= max_bytes:
                break
            chosen.append(image_id)
            count -= 1
            total -= size_bytes
        # a fresh statement (a fresh snapshot): a lease committed since the SELECT still protects its image
        deleted = {
            r[0]
            for r in cur.execute(
                f"DELETE FROM images WHERE image_id = ANY(%s) AND {UNLEASED} RETURNING image_id",
                (chosen, now),
            ).fetchall()
        }
        evicted += [i for i in chosen if i in deleted]
        refused += [i for i in chosen if i not in deleted]


def one_row(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The one row of a statement that always returns one (an aggregate, INSERT ... RETURNING)."""
    row = cur.fetchone()
    if row is None:  # cannot happen for these statements; a clear error rather than a TypeError
        raise StoreError("The image catalog returned no row where one was expected.")
    return tuple(row)
