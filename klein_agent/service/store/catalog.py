"""The catalog interface: the rows of a store (metadata, lineage, LRU order, leases), never the bytes.

`SQLiteCatalog` (sqlite_catalog.py, the embedded store) and `PostgresCatalog` (pg_catalog.py, shared by many
front-ends) implement it; `tests/test_store_interfaces.py` runs the same tests over both.

THE INVARIANT (the store's, which `ImageStore` enforces with this interface and a `BlobStore`):
    a row never points at a missing blob. Blob first, row second: `ImageStore.put` writes the blob durably before
    `insert` commits its row; `delete` and eviction commit the row's removal before the blob is deleted. A crash
    in between leaves at worst a blob without a row (an orphan), which `ImageStore`'s sweep removes once it is
    older than any put in flight; never a row without its blob.

What a catalog must guarantee:
- `insert` adds the row and evicts, in one transaction, the least recently used rows that carry no unexpired
  lease (never the new row) until both bounds hold; it returns the evicted ids, whose blobs the caller deletes
  after the commit. If the leased rows alone break a bound it raises StoreFullError and commits nothing.
- Ids are unique: inserting an id twice fails (and commits nothing).
- Call keys are unique: inserting a row whose `call_id` a row has already raises CallStoredError naming that row
  (and commits nothing), also when two front-ends insert the same key at once.
- A lease taken with `require_stored` is checked and written in one transaction, ordered against eviction.
- `page` is keyset pagination, newest first: a position names where a page ended, so pages stay stable (no
  repeats, no gaps among the rows that were there) while rows are inserted or evicted. SQLite orders by its
  insertion sequence; PostgreSQL by (created_at, image_id) with created_at from clock_timestamp().
- Migrations (schema steps) are applied once, also when two processes open a new store at once.
- Verdicts belong to their image: `delete` and eviction remove an image's verdicts in the same transaction as
  its row, so no verdict outlives its image and a new image never inherits one.
- Write failures raise StoreWriteError (the message names the store and what to do); then nothing was committed,
  unless `was_inserted` says otherwise.

Live feed: `listen()` returns a `Feed` of the ids of images inserted or given a verdict from then on (PostgreSQL:
NOTIFY inside the writing transaction, so a feed sees only committed changes, each once), or None where the
catalog cannot push (SQLite): the caller then polls `page(limit=1)`, `totals()` and `verdict_mark()`, as the
gallery does. Verdicts carry a mark (`verdict_mark`) that grows in commit order, so a reader that remembers the
last mark it saw asks `verdict_changes` for what changed since, at a cost bounded by the changes, not the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from klein_agent.service.store.records import (
    LeaseRow,
    NewImage,
    SessionSummary,
    StoredImage,
    VerdictRecord,
    Verdicts,
)


class Feed(Protocol):
    """Ids of images inserted or given a verdict after the feed was opened, in commit order, on a connection of
    its own."""

    def wait(self, timeout_s: float) -> list[str]:
        """The ids that arrived since the last call, waiting up to `timeout_s` seconds for the first one ([]: none
        came). Raises StoreError when the connection is lost (open a new feed)."""
        ...

    def close(self) -> None:
        """Stop listening and close the connection. Idempotent."""
        ...


class Catalog(Protocol):
    """The rows of one store. Thread-safe; every method is one short transaction unless it says otherwise."""

    location: str  # for messages: the database file, or the server and database name
    read_only: bool
    exclusive: bool  # True when, at open, no other process had this store open (the sweep may then be eager)

    def open_done(self) -> None:
        """The open-time repair (sweep, eviction) is over; other processes may now open the store."""
        ...

    def schema_versions(self) -> list[int]:
        """The migration versions applied, ascending, each once."""
        ...

    def insert(
        self, image: NewImage, *, max_images: int, max_bytes: int, now: float
    ) -> tuple[float, list[str]]:
        """Insert the row of `image` (its blob is stored already) and evict, in one transaction; `now` is the lease
        clock. Returns (created_at, evicted ids). Raises StoreFullError or StoreWriteError (nothing committed)."""
        ...

    def evict(self, *, max_images: int, max_bytes: int, now: float) -> list[str]:
        """Evict unleased rows, least recently used first, until both bounds hold (as `insert` does). Returns the
        evicted ids; raises StoreFullError (nothing deleted) if leased rows alone break a bound."""
        ...

    def was_inserted(self, image_id: str) -> bool | None:
        """After a failed insert: is the row there? None when that cannot be known now."""
        ...

    def get(self, image_id: str) -> StoredImage | None:
        """The row of a well-formed id, or None. Not a use."""
        ...

    def touch(self, image_id: str) -> None:
        """Record a use for the LRU. Best effort: a failure is logged, never raised."""
        ...

    def contains(self, image_ids: Iterable[str]) -> set[str]:
        """The ids among `image_ids` (well-formed) that have a row now."""
        ...

    def find_calls(self, call_keys: Sequence[str]) -> dict[str, StoredImage]:
        """The rows stored under these call keys (`NewImage.call_id`), by key; keys without a row are absent."""
        ...

    def find_content(self, content_key: str) -> StoredImage | None:
        """The newest row stored with this content key, or None."""
        ...

    def page(
        self, *, session: str | None, limit: int, before: object | None, standing: str | None = None
    ) -> tuple[list[StoredImage], object | None]:
        """Up to `limit` rows, newest first, of one session (None: all), after the position `before` (None: from
        the newest). With `standing` ("pick" or "reject"), only the rows whose standing verdict (see
        `verdicts`) is that one. Returns the rows and the position to pass for the next page (None: this was
        the last); a position is the same whatever the filters, so it stays valid across them."""
        ...

    def valid_position(self, value: object) -> bool:
        """Whether `value` (from a decoded cursor) is a position this catalog can page from."""
        ...

    def sessions(self) -> list[SessionSummary]:
        """Every session with its count and first and last times, the one with the newest row first."""
        ...

    def totals(self) -> tuple[int, int]:
        """(row count, sum of size_bytes)."""
        ...

    def sizes(self) -> list[tuple[str, int]]:
        """(image_id, size_bytes) of every row: what the sweep checks against the blobs."""
        ...

    def delete(self, image_ids: Iterable[str]) -> None:
        """Delete these rows (leases or not) and their verdicts in one transaction. Raises StoreWriteError."""
        ...

    def add_verdict(self, image_id: str, verdict: str, reason: str, *, keep: int) -> VerdictRecord:
        """Record `verdict` ("pick", "reject" or "note", already checked) with `reason` (checked, "" for none) on
        the stored image `image_id`, stamped with the catalog's clock, and return the record. In the same
        transaction, delete this image's records beyond its newest `keep` (keep >= 1), except its standing one
        (the latest "pick" or "reject"), which is never deleted while the image is stored: a thousand notes never
        lose a pick. Raises UnknownImageError (nothing recorded) when the image has no row, StoreWriteError."""
        ...

    def verdicts(self, image_ids: Iterable[str], *, notes: int) -> dict[str, Verdicts]:
        """The verdicts of the stored images among `image_ids`, keyed by id; an image without any is absent.
        For each: its standing (the latest "pick" or "reject" record; a later one of either replaces it; notes
        never change it) and its newest `notes` notes, newest first. "Latest" is recording order (ties on the
        clock are broken by it). One read; no use for the LRU."""
        ...

    def copy_verdicts(self, image_id: str, records: Sequence[VerdictRecord], *, keep: int) -> int:
        """For `store copy`: record `records` (checked, oldest first, each with its own `at`) on the stored image
        `image_id`, in recording order and one transaction, trimmed as `add_verdict` trims, unless the image has
        verdicts already (a rerun of an interrupted copy). Returns how many were recorded (0: it had some).
        All or nothing, so a copy cut short never leaves half a history. Raises UnknownImageError,
        StoreWriteError."""
        ...

    def verdict_mark(self) -> int:
        """The mark of the newest verdict record (its `seq`; 0 when none was ever recorded): a cheap head check
        for the live feed. Marks grow in commit order, across every front-end: once a reader has seen mark m,
        no record with a mark <= m commits later (so `verdict_changes(m, ...)` misses nothing)."""
        ...

    def verdict_changes(self, after: int, *, limit: int) -> tuple[list[str], int]:
        """What changed since the mark `after`: the ids of the images among the next `limit` records recorded
        after it (in recording order, each id once; an image evicted since is absent), and the mark to pass next
        (that of the last record read; `after` when none). One read of at most `limit` rows; no use for the LRU."""
        ...

    def take_leases(
        self, holder: str, image_ids: Iterable[str], *, expires_at: float, require_stored: bool
    ) -> None:
        """Lease `image_ids` to `holder` until `expires_at` (extending one it holds). With `require_stored`, raises
        UnknownImageError and leases nothing if one is not stored (check and lease are one transaction)."""
        ...

    def renew_leases(self, holders: Iterable[str], expires_at: float) -> None:
        """Move every lease of `holders` to `expires_at`."""
        ...

    def release_leases(self, holder: str, now: float) -> None:
        """Delete `holder`'s leases and every lease expired at `now`."""
        ...

    def purge_expired_leases(self, now: float) -> None:
        """Delete the leases expired at `now` (left by a process that died)."""
        ...

    def lease_rows(self) -> list[LeaseRow]:
        """Every lease row, expired or not, by image id then holder."""
        ...

    def listen(self) -> Feed | None:
        """A feed of the ids inserted or given a verdict from now on, or None when this catalog cannot push
        (poll instead)."""
        ...

    def close(self) -> None:
        """Release the connection. Idempotent; later calls raise StoreError."""
        ...
