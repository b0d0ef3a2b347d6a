"""`ImageStore`: the facade callers use. It composes a `Catalog` (rows) and a `BlobStore` (bytes) and keeps
the invariant between them (catalog.py): blob first, row second; row removed first, blob second; orphans swept.

It imports no torch (nor anything that does), so a store can be opened, swept and read in milliseconds, by the
server and by a crash-test child alike.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from klein_agent.rules.limits import (
    LEASE_RENEW_S,
    LEASE_TTL_S,
    MAX_LIST_LIMIT,
    STORE_MAX_BYTES,
    STORE_MAX_IMAGES,
    VERDICT_HISTORY_PER_IMAGE,
    VERDICT_NOTES_SHOWN,
)
from klein_agent.rules.resolution import check_session
from klein_agent.rules.verdicts import STANDING, check_verdict
from klein_agent.service.store.blobs import BlobMissingError, BlobStore
from klein_agent.service.store.catalog import Catalog
from klein_agent.service.store.cursors import decode_cursor, encode_cursor
from klein_agent.service.store.folder_blobs import FolderBlobStore
from klein_agent.service.store.leases import Renewer
from klein_agent.service.store.records import (
    CallStoredError,
    NewImage,
    SessionSummary,
    StoredImage,
    StoreError,
    StoreFullError,
    StoreStats,
    StoreWriteError,
    UnknownImageError,
    VerdictRecord,
    Verdicts,
    blob_key,
    check_parents,
    check_png,
    folder_problem,
    is_valid_id,
    new_image_id,
    recipe_json,
)
from klein_agent.service.store.sqlite_catalog import SQLiteCatalog

log = logging.getLogger("klein_agent.service.store")

IMAGES_DIR = "images"
# Orphans and temp files younger than this are left alone when another process may be mid-put (see `sweep`).
SHARED_SWEEP_MIN_AGE_S = 3600.0


class ImageStore:
    """A bounded, crash-safe, thread-safe store of PNG images and how they were made.

    `ImageStore(root)` opens the local store in the folder `root`: `SQLiteCatalog(root)` and
    `FolderBlobStore(root/images)`; `ImageStore.over(catalog, blobs, root=...)` composes any pair. Opening repairs
    what a crash can leave (`sweep`), purges expired leases and evicts down to the bounds (they may have been
    lowered). Leases hold across processes (`lease`, `pinned`); a thread renews this store's leases every
    `lease_renew_s` seconds until they are released, and each expires `lease_ttl_s` seconds after its last renewal
    (`clock`: Unix time, which tests move).

    `read_only=True` opens an existing store for reading only (the gallery beside a running server): no sweep, no
    eviction, no migration, reads do not count as uses; `put` raises StoreError, and a missing store or an unknown
    schema raises StoreError at once.
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
        folder = Path(root).expanduser().resolve()
        _check_bounds(max_bytes, max_images, lease_ttl_s, lease_renew_s)
        if not read_only:
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise StoreError(
                    f"Cannot create the image store at {folder}: {folder_problem(folder, e)}."
                ) from e
        blobs = FolderBlobStore(folder / IMAGES_DIR, read_only=read_only)
        catalog = SQLiteCatalog(folder, read_only=read_only)
        self._setup(catalog, blobs, folder, max_bytes, max_images, lease_ttl_s, lease_renew_s, clock)

    @classmethod
    def over(
        cls,
        catalog: Catalog,
        blobs: BlobStore,
        *,
        root: Path,
        max_bytes: int = STORE_MAX_BYTES,
        max_images: int = STORE_MAX_IMAGES,
        lease_ttl_s: float = LEASE_TTL_S,
        lease_renew_s: float = LEASE_RENEW_S,
        clock: Callable[[], float] = time.time,
    ) -> ImageStore:
        """A store over these backends (opened by the caller; closed with the store). `root` is where its local
        files live (the path policy keeps tools out of it). Raises what `ImageStore(root)` raises."""
        _check_bounds(max_bytes, max_images, lease_ttl_s, lease_renew_s)
        store = cls.__new__(cls)
        store._setup(catalog, blobs, root, max_bytes, max_images, lease_ttl_s, lease_renew_s, clock)
        return store

    def _setup(
        self,
        catalog: Catalog,
        blobs: BlobStore,
        root: Path,
        max_bytes: int,
        max_images: int,
        lease_ttl_s: float,
        lease_renew_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.catalog, self.blobs, self.root = catalog, blobs, root
        self.max_bytes, self.max_images = max_bytes, max_images
        self.read_only = catalog.read_only
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._lock = threading.Lock()  # guards _holders and _closed
        self._holders: set[str] = set()  # this store's live leases, renewed together
        self._renewer = Renewer(self.renew_leases, lease_renew_s)
        self._closed = False
        if self.read_only:
            return
        try:
            catalog.purge_expired_leases(clock())
            self.sweep(min_age_s=0.0 if catalog.exclusive else SHARED_SWEEP_MIN_AGE_S)
            self._delete_blobs(catalog.evict(max_images=max_images, max_bytes=max_bytes, now=clock()))
            catalog.open_done()
        except BaseException:
            self.close()
            raise

    # ---- public API -------------------------------------------------------------------------------------

    @staticmethod
    def is_valid_id(image_id: str) -> bool:
        """The strict shape check that runs before any catalog or blob use of an id."""
        return is_valid_id(image_id)

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
        created_at: float | None = None,
        call_key: str | None = None,
    ) -> StoredImage:
        """Store one PNG durably; when this returns, the image survives a crash or kill -9.

        `image_id` is a fresh id from `new_image_id()` when the caller needs it before the image is stored (an
        input that is named as a parent but stored only once the call succeeds); by default one is minted here.
        `content_key` (e.g. a digest of the pixels) lets `find_content` return this image for the same content.
        The blob is made durable first and the row committed second; the LRU eviction runs in the insert's
        transaction, and evicted blobs are deleted after the commit. `parents` are recorded as given, also those
        no longer stored: a finished picture is never lost for its lineage, and `absent` tells which are gone.
        `created_at` (Unix time) is when the image was first made; None (every caller but `store copy`, which keeps
        the original time) means now.
        `call_key` (`rules.calls.picture_keys`) names this picture of a keyed call: when a row has it already (a
        retry, here or on another front-end, stored it first) that row is returned and nothing is stored (a blob
        written meanwhile is deleted), so the returned id may differ from `image_id`.
        Raises ValueError for a malformed argument or an id already stored, UnknownImageError for a malformed
        parent id, StoreFullError, StoreWriteError.
        """
        if self.read_only:
            raise StoreError(
                f"The image store at {self.root} is open read-only; nothing can be stored through it."
            )
        data = check_png(png, width, height)
        text = recipe_json(recipe)
        session = check_session(session)
        parent_ids = check_parents(parents)
        if len(data) > self.max_bytes:
            raise StoreFullError(
                f"The image is {len(data)} bytes, larger than the whole store quota ({self.max_bytes} bytes). "
                "Use a smaller size or raise the store quota."
            )
        if image_id is not None and not is_valid_id(image_id):
            raise ValueError(f"image_id {image_id!r} is not an id from new_image_id()")
        self._check_open()
        image_id = image_id or new_image_id()
        if self.catalog.contains([image_id]):  # a blob put would replace the stored image's bytes
            raise ValueError(f"image_id {image_id!r} is stored already; mint a new one with new_image_id()")
        if call_key is not None:
            stored = self.catalog.find_calls([call_key]).get(call_key)
            if stored is not None:  # the common retry: no blob written, none to delete
                return stored
        key = blob_key(image_id)
        self.blobs.put(key, data)  # blob first ...
        if created_at is not None and not (isinstance(created_at, (int, float)) and 0 <= created_at < 2**33):
            raise ValueError(f"created_at must be a Unix time in seconds, got {created_at!r}")
        row = NewImage(
            image_id,
            width,
            height,
            len(data),
            session,
            parent_ids,
            text,
            content_key,
            call_id=call_key,
            created_at=created_at,
        )
        try:  # ... row second
            created_at, evicted = self.catalog.insert(
                row, max_images=self.max_images, max_bytes=self.max_bytes, now=self._clock()
            )
        except CallStoredError as exc:  # another attempt of this call committed first: keep its picture
            self.blobs.delete(key)
            return self._row(exc.image_id)
        except StoreError as exc:
            inserted = self.catalog.was_inserted(image_id) if isinstance(exc, StoreWriteError) else False
            if inserted is False:
                self.blobs.delete(key)
            # None: we cannot tell; keep the blob, because an orphan is swept but a row without a blob is not
            if inserted is not True:
                raise
            log.warning(
                "put: %s raised after the record was committed; the image is kept", type(exc).__name__
            )
            created_at, evicted = time.time(), []
        except BaseException:
            if self.catalog.was_inserted(image_id) is False:
                self.blobs.delete(key)
            raise
        self._delete_blobs(evicted)
        if evicted:
            log.debug("evicted %d image(s) to stay within the store quota", len(evicted))
        return StoredImage(
            image_id, width, height, len(data), created_at, session, parent_ids, json.loads(text), key
        )

    def get(self, image_id: str) -> StoredImage:
        """Metadata of one image. Counts as a use for the LRU. Raises UnknownImageError (also when its blob is
        missing or damaged: then the next open drops the row)."""
        image = self._row(image_id)
        self.catalog.touch(image_id)
        if self.blobs.size(image.blob_key) != image.size_bytes:
            log.warning(
                "the blob of image %s is missing or damaged; the next open drops its record", image_id
            )
            raise UnknownImageError(image_id)
        return image

    def read_png(self, image_id: str) -> bytes:
        """The PNG bytes of one image. Counts as a use for the LRU. Raises UnknownImageError when the image is not
        stored, or was evicted between the row check and the read, or its blob is missing or damaged."""
        image = self._row(image_id)
        try:
            data = self.blobs.get(image.blob_key)
        except BlobMissingError:
            log.warning("the blob of image %s is missing or not a plain file; refusing to read it", image_id)
            raise UnknownImageError(image_id) from None
        if len(data) != image.size_bytes:
            log.warning("the blob of image %s is damaged; refusing to read it", image_id)
            raise UnknownImageError(image_id)
        self.catalog.touch(image_id)
        return data

    def exists(self, image_id: str) -> bool:
        """Whether the id names a stored image. Not a use: the LRU is untouched."""
        return is_valid_id(image_id) and bool(self.catalog.contains([image_id]))

    def delete(self, image_id: str) -> None:
        """Remove one image (row first, then its blob). Best effort: an id that is gone already, or a store that
        cannot be written now, is logged, not raised (callers use it to undo part of a call that failed)."""
        if not is_valid_id(image_id):
            return
        try:
            self.catalog.delete([image_id])
        except StoreError as exc:
            log.warning("could not remove %s from the store: %s", image_id, exc)
            return
        self.blobs.delete(blob_key(image_id))

    def find_calls(self, call_keys: Sequence[str]) -> dict[str, StoredImage]:
        """The images stored under these call keys (`rules.calls.picture_keys`), by key. Not a use."""
        self._check_open()
        return self.catalog.find_calls(call_keys)

    def find_content(self, content_key: str) -> StoredImage | None:
        """The newest image stored with this `content_key`, or None."""
        self._check_open()
        return self.catalog.find_content(content_key)

    def list_images(
        self,
        *,
        session: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        standing: str | None = None,
    ) -> tuple[list[StoredImage], str | None]:
        """One page of images, newest first, optionally of one session and of one standing verdict ("pick" or
        "reject"); returns (page, next_cursor or None). Keyset pagination: pages stay stable while images are
        added or evicted. Raises ValueError for a bad session, limit, standing or cursor."""
        session = check_session(session)
        if standing not in (None, *STANDING):
            raise ValueError(f"standing must be one of {', '.join(STANDING)} or omitted, got {standing!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, got {limit!r}")
        before = None if cursor is None else decode_cursor(cursor, session, self.catalog.valid_position)
        self._check_open()
        page, position = self.catalog.page(session=session, limit=limit, before=before, standing=standing)
        return page, (None if position is None else encode_cursor(position, session))

    def record_verdict(self, image_id: str, verdict: str, reason: str | None = None) -> VerdictRecord:
        """Record a verdict ("pick", "reject" or "note") with a short reason on a stored image; the rule is
        `rules.verdicts` (the latest pick or reject is the standing; each image keeps its newest
        VERDICT_HISTORY_PER_IMAGE records). Not a use for the LRU. Raises RequestError for a bad verdict or reason,
        UnknownImageError, StoreError when the store is open read-only, StoreWriteError."""
        verdict, text = check_verdict(verdict, reason)
        if self.read_only:
            raise StoreError(
                f"The image store at {self.root} is open read-only; verdicts cannot be recorded."
            )
        if not is_valid_id(image_id):
            raise UnknownImageError(image_id)
        self._check_open()
        return self.catalog.add_verdict(image_id, verdict, text, keep=VERDICT_HISTORY_PER_IMAGE)

    def verdicts(self, image_ids: Iterable[str]) -> dict[str, Verdicts]:
        """The standing verdict and newest VERDICT_NOTES_SHOWN notes of each stored image among `image_ids` that
        has any (malformed ids are skipped)."""
        self._check_open()
        return self.catalog.verdicts([i for i in image_ids if is_valid_id(i)], notes=VERDICT_NOTES_SHOWN)

    def verdict_mark(self) -> int:
        """The mark of the newest verdict (0: none yet); it grows with every verdict recorded, in commit order."""
        self._check_open()
        return self.catalog.verdict_mark()

    def verdict_changes(self, after: int, *, limit: int) -> tuple[list[str], dict[str, Verdicts], int]:
        """The images given a verdict after the mark `after`, from at most `limit` records: (their ids in
        recording order, their verdicts now as `verdicts` gives them (an id evicted meanwhile is absent), the mark
        to pass next: `after` itself when nothing was recorded since). Call again from the mark returned until
        it reaches the `verdict_mark()` you saw, or stops moving. Bounded by `limit`, not by the store: at most
        `limit` records, their ids and those ids' kept histories are read."""
        self._check_open()
        ids, mark = self.catalog.verdict_changes(after, limit=limit)
        return ids, self.catalog.verdicts(ids, notes=VERDICT_NOTES_SHOWN), mark

    def sessions(self) -> list[SessionSummary]:
        """Every session with its image count and first and last times, the one with the newest image first."""
        self._check_open()
        return self.catalog.sessions()

    def absent(self, image_ids: Iterable[str]) -> list[str]:
        """The ids among `image_ids` that are not stored (now), in their order, without repeats."""
        ids = list(dict.fromkeys(image_ids))
        self._check_open()
        present = self.catalog.contains([i for i in ids if is_valid_id(i)])
        return [i for i in ids if i not in present]

    def stats(self) -> StoreStats:
        """The current image count and total PNG bytes, with the store's bounds and root."""
        self._check_open()
        count, total = self.catalog.totals()
        return StoreStats(count, total, self.max_bytes, self.max_images, self.root)

    def sweep(self, min_age_s: float) -> None:
        """Repair what a crash can leave: rows whose blob is missing, not plain or of the wrong size (dropped),
        blobs with no row and partial writes older than `min_age_s` (deleted). With `min_age_s` > 0 (another
        process may be between its blob and its row) younger blobs are kept; rows without a blob are never a
        transient state, so they are always dropped."""
        rows = self.catalog.sizes()
        blobs = self.blobs.inventory()
        keep: set[str] = set()
        broken: list[str] = []
        for image_id, size_bytes in rows:
            key = blob_key(image_id) if is_valid_id(image_id) else ""
            info = blobs.get(key)
            if info is not None and info.plain and info.size == size_bytes:
                keep.add(key)
            else:
                broken.append(image_id)
        if broken:
            self.catalog.delete(broken)
            log.warning("image store: dropped %d record(s) whose blob was missing or damaged", len(broken))
        now = time.time()
        orphans = [k for k, info in blobs.items() if k not in keep and now - info.modified_at >= min_age_s]
        for key in orphans:
            self.blobs.delete(key)
        removed = len(orphans) + self.blobs.sweep_partial(min_age_s)
        if removed:
            log.info("image store: removed %d orphan or partial blob(s)", removed)

    def pinned(self, image_ids: Iterable[str]) -> Lease:
        """A `lease` on stored images, released when the `with` block exits. Raises UnknownImageError (leasing
        nothing) if an id is not in the store, so a call learns at once that its input is gone."""
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
        """A new, empty lease (no catalog write yet): add ids as a call learns them, release it when the call
        ends (it is a context manager). Raises StoreError on a read-only or closed store."""
        if self.read_only:
            raise StoreError(
                f"The image store at {self.root} is open read-only; it cannot hold images in use."
            )
        self._check_open()
        return Lease(self, "lease_" + secrets.token_urlsafe(12))

    def take_leases(self, holder: str, image_ids: Iterable[str], *, require_stored: bool = True) -> None:
        """Lease `image_ids` to `holder` until `lease_ttl_s` from now, renewed until `release_leases(holder)`.
        With `require_stored`, raises UnknownImageError and leases nothing unless every id is stored now."""
        if isinstance(image_ids, str):
            raise TypeError("take_leases() takes a collection of image ids, not one id string")
        ids = tuple(image_ids)
        for image_id in ids:
            if not is_valid_id(image_id):
                raise UnknownImageError(image_id)
        self._check_open()
        if not ids:  # nothing to hold: no write transaction (a generate from a prompt alone leases nothing)
            return
        self.catalog.take_leases(
            holder, ids, expires_at=self._clock() + self.lease_ttl_s, require_stored=require_stored
        )
        with self._lock:
            self._holders.add(holder)
        self._renewer.start()

    def renew_leases(self) -> None:
        """Move every live lease of this store to `lease_ttl_s` from now (what the renewing thread runs)."""
        with self._lock:
            holders = set(self._holders)
        if holders:
            self.catalog.renew_leases(holders, self._clock() + self.lease_ttl_s)

    def release_leases(self, holder: str) -> None:
        """End `holder`'s leases (and purge expired ones) if it took any. Best effort, like `delete`: a store that cannot be
        written now is logged, and the lease then lapses at its expiry."""
        with self._lock:
            held = holder in self._holders
            self._holders.discard(holder)
            if self._closed or not held:  # a holder that leased nothing has no rows: no write transaction
                return
        try:
            self.catalog.release_leases(holder, self._clock())
        except (StoreError, OSError) as exc:
            log.warning("could not release the images a call used (they are freed at expiry): %s", exc)

    def close(self) -> None:
        """Release this store's leases and close its backends. Idempotent; later calls raise StoreError."""
        self._renewer.stop()
        with self._lock:
            holders = list(self._holders)
        for holder in holders:
            self.release_leases(holder)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.catalog.close()
        self.blobs.close()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageStore({str(self.root)!r}, max_bytes={self.max_bytes}, max_images={self.max_images})"

    # ---- internals ----------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("The image store is closed.")

    def _row(self, image_id: str) -> StoredImage:
        if not is_valid_id(image_id):
            raise UnknownImageError(image_id)
        self._check_open()
        image = self.catalog.get(image_id)
        if image is None:
            raise UnknownImageError(image_id)
        return image

    def _delete_blobs(self, image_ids: Iterable[str]) -> None:
        for image_id in image_ids:
            self.blobs.delete(blob_key(image_id))  # a failure leaves an orphan, which the sweep removes


class Lease:
    """The images one call uses, held against eviction by every process on the store until `release` (or the
    end of a `with` block), renewed meanwhile by the store's thread (`leases` has the invariant). One holder token;
    ids are added as the call learns them. Not for sharing between calls: each call takes its own."""

    def __init__(self, store: ImageStore, holder: str) -> None:
        self.store = store
        self.holder = holder

    def add(self, image_ids: Iterable[str], *, require_stored: bool = True) -> None:
        """Lease more ids (`ImageStore.take_leases`). Raises UnknownImageError (adding none) for an id that is not
        stored when it must be."""
        self.store.take_leases(self.holder, image_ids, require_stored=require_stored)

    def read_png(self, image_id: str) -> bytes:
        """Lease a stored image, then read its PNG, so an input is protected before its bytes are read. Raises
        UnknownImageError."""
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


def _check_bounds(max_bytes: int, max_images: int, lease_ttl_s: float, lease_renew_s: float) -> None:
    for name, value in (("max_bytes", max_bytes), ("max_images", max_images)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 < lease_renew_s < lease_ttl_s:
        raise ValueError(
            f"lease_renew_s must be above 0 and below lease_ttl_s, got {lease_renew_s!r} and {lease_ttl_s!r}"
        )
