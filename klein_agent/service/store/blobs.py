"""The blob interface: the bytes of a store, one immutable blob per key, never the rows.

`FolderBlobStore` (folder_blobs.py: files in a folder) and `S3BlobStore` (s3_blobs.py: a create-only PUT with
If-None-Match, a listing with LastModified, DELETE) implement it; `tests/test_store_interfaces.py` runs the same
tests over both.

A blob store knows nothing of rows, leases or quotas. The invariant it serves (catalog.py) is kept by
`ImageStore`: blob first, row second; row deleted first, blob second; a blob with no row is an orphan that
`ImageStore`'s sweep deletes through `delete` once `inventory` says it is older than any put in flight.

What a blob store must guarantee:
- `put` is atomic and durable: when it returns, the whole blob survives a crash; a reader never sees part of it;
  a failed or interrupted put leaves no blob under the key (at worst partial data that `sweep_partial` removes).
- `get` returns the whole blob or raises BlobMissingError; it never follows a link out of the store.
- Keys are what `records.blob_key` makes: lowercase hex + ".png", no separators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from klein_agent.service.store.records import StoreError


class BlobMissingError(StoreError, LookupError):
    """No intact blob under this key: absent, or not a plain blob (a link, a folder) where one should be."""


@dataclass(frozen=True)
class BlobInfo:
    """What `inventory` knows of one blob: its size in bytes, when it was last written (Unix time), and whether
    it is a plain blob (False: a link or other thing planted where a blob should be; the sweep removes it)."""

    size: int
    modified_at: float
    plain: bool = True


class BlobStore(Protocol):
    """The bytes of one store. Thread-safe."""

    location: str  # for messages: the folder, or the bucket's URL

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically and durably (replacing nothing: keys are fresh). Raises
        StoreWriteError, naming where and what to do, with nothing left under `key`."""
        ...

    def get(self, key: str) -> bytes:
        """The whole blob. Raises BlobMissingError, or StoreError for another read failure."""
        ...

    def size(self, key: str) -> int | None:
        """The size of a plain blob under `key`, or None (absent, or not a plain blob)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob if it is there. Best effort: a failure is logged (the sweep retries), never raised."""
        ...

    def inventory(self) -> dict[str, BlobInfo]:
        """Every blob by key, partial writes excluded."""
        ...

    def sweep_partial(self, min_age_s: float) -> int:
        """Remove what interrupted puts left (temporary files, incomplete uploads) older than `min_age_s`; returns
        how many."""
        ...

    def close(self) -> None:
        """Release what the store holds open. Idempotent."""
        ...
