"""The persistent image store: a catalog of rows behind one interface, blobs of bytes behind another.

    catalog.py         `Catalog`: rows, lineage, LRU order, leases, cursors; the invariant, written down
    blobs.py           `BlobStore`: put (atomic, durable), get, delete, inventory, sweep of partial writes
    sqlite_catalog.py  `SQLiteCatalog`: the local catalog (<root>/store.sqlite3, WAL, a lock file)
    migrations.py      the SQLite schema as numbered functions, applied once
    folder_blobs.py    `FolderBlobStore`: the local blobs (<root>/images/<sha256(id)>.png)
    pg_catalog.py      `PostgresCatalog`: the shared catalog (psycopg 3 + pool, advisory locks, LISTEN/NOTIFY)
    pg_migrations.py   the PostgreSQL schema as numbered functions, applied once under an advisory lock
    pg_eviction.py     least-recently-used unleased rows deleted under the eviction lock
    pg_feed.py         `PostgresFeed`: the live feed over LISTEN/NOTIFY
    s3_blobs.py        `S3BlobStore`: the shared blobs, one object per blob under s3://BUCKET/PREFIX (obstore)
    dsn.py             DSNs and s3:// URLs recognised, and shown without their secrets
    open.py            `open_store`: the pair a `--store PATH|postgresql://…` and `--blobs s3://…` name
    copy.py            `klein-agent store copy`: a whole store into another, verified
    cursors.py         the list cursor codec
    leases.py          what a lease promises; the thread that renews them
    records.py         ids, records, errors, and the checks on what put() is given
    image_store.py     `ImageStore`: the facade that composes one of each and keeps them consistent

Invariant: a row never points at a missing blob (blob first, row second; row removed first, blob second).
Where the store lives is the caller's choice (`option_types.store_locations`); nothing here picks a folder.
"""

from klein_agent.rules.limits import MAX_LIST_LIMIT
from klein_agent.service.store.image_store import ImageStore, Lease
from klein_agent.service.store.records import (
    UNREADABLE_RECIPE,
    SessionSummary,
    StoredImage,
    StoreError,
    StoreFullError,
    StoreStats,
    StoreWriteError,
    UnknownImageError,
    VerdictRecord,
    Verdicts,
    new_image_id,
)
from klein_agent.service.store.sqlite_catalog import read_only_uri

__all__ = [
    "MAX_LIST_LIMIT",
    "UNREADABLE_RECIPE",
    "ImageStore",
    "Lease",
    "SessionSummary",
    "StoreError",
    "StoreFullError",
    "StoreStats",
    "StoreWriteError",
    "StoredImage",
    "UnknownImageError",
    "VerdictRecord",
    "Verdicts",
    "new_image_id",
    "read_only_uri",
]
