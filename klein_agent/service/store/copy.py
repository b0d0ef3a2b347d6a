"""Copying a whole store into another (`klein-agent store copy SRC DST`): embedded → PostgreSQL + S3 and back.

What moves: every image (its id, size, session, parents in order, recipe, creation time, PNG bytes), its
verdicts (the standing pick or reject and the kept notes, with their times and in their order) and every lease row
(holder, expiry), oldest image first, so listings and sessions read the same on both sides. Each image
goes through `ImageStore.put` of the destination, so the destination's invariant holds at every moment (blob first,
row second): a copy interrupted anywhere leaves a destination that is consistent, and running the same copy again
finishes it (ids already there with the same bytes are skipped; the same id with other bytes is a conflict).

An image's verdicts are copied in one transaction, and only onto an image that
has none there yet, so a rerun never doubles them. Then the copy is verified from the destination's side: the same
ids, each with equal fields, equal verdicts and a PNG whose SHA-256 equals the source's. Not copied: the picks and
rejects a later one replaced (no reader sees them), content keys (the hint that an input imported twice is stored once; the
next import of such an input stores it again) and the LRU order (the destination's starts at the copy's order).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

from klein_agent.rules.limits import VERDICT_HISTORY_PER_IMAGE
from klein_agent.service.store.image_store import ImageStore
from klein_agent.service.store.records import (
    LeaseRow,
    StoredImage,
    StoreError,
    StoreFullError,
    VerdictRecord,
    Verdicts,
)

log = logging.getLogger(__name__)

# A time survives a round trip through either catalog within this: PostgreSQL keeps microseconds, and a float64 of
# a Unix time near 2**31 s has a spacing of 2**-22 s (0.24 us), so one rounding each way stays under 1 us + 2 ulp.
TIME_TOLERANCE_S = 1e-6 + 2 * 2.0**-22
_PAGE = 100


class CopyConflictError(StoreError):
    """The destination holds an image with one of the source's ids but other bytes or fields."""


@dataclass
class CopyReport:
    """What a copy did and found: images copied and already there (skipped), lease rows and verdicts copied, and the
    problems
    the verification found (empty: the copy is complete and equal)."""

    copied: int = 0
    skipped: int = 0
    leases: int = 0
    verdicts: int = 0
    source_count: int = 0
    source_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every source image is in the destination with equal fields and bytes."""
        return not self.problems


def source_images(store: ImageStore) -> list[StoredImage]:
    """Every image of `store`, oldest first (the listing is newest first; one read of each page, no uses)."""
    images: list[StoredImage] = []
    page, cursor = store.list_images(limit=_PAGE)
    while True:
        images += page
        if cursor is None:
            return images[::-1]
        page, cursor = store.list_images(limit=_PAGE, cursor=cursor)


def copy_store(source: ImageStore, destination: ImageStore) -> CopyReport:
    """Copy every image and lease row of `source` into `destination`, then verify (`verify_copy`). The destination
    must be able to hold them all: its bounds must fit the source plus what it holds (else StoreFullError before
    anything is written). Raises CopyConflictError (an id there with other bytes), StoreError (a backend failure:
    run the copy again to finish it); never deletes anything from either store."""
    report = CopyReport()
    images = source_images(source)
    report.source_count = len(images)
    report.source_bytes = sum(i.size_bytes for i in images)
    count, total = destination.stats().count, destination.stats().total_bytes
    if count + len(images) > destination.max_images or total + report.source_bytes > destination.max_bytes:
        raise StoreFullError(
            f"The destination {destination.catalog.location} holds {count} images ({total} bytes) and its quota is "
            f"{destination.max_images} images, {destination.max_bytes} bytes: the source's {len(images)} images "
            f"({report.source_bytes} bytes) would not fit without evicting some. Raise the destination's quota."
        )
    for image in images:
        data = source.blobs.get(image.blob_key)
        there = destination.catalog.get(image.image_id)
        if there is not None:
            _check_same(image, there, data, destination)
            report.skipped += 1
            continue
        destination.put(
            data,
            width=image.width,
            height=image.height,
            recipe=image.recipe,
            parents=image.parents,
            session=image.session,
            image_id=image.image_id,
            created_at=image.created_at,
        )
        report.copied += 1
    report.verdicts = copy_verdicts(images, source, destination)
    report.leases = copy_leases(source.catalog.lease_rows(), destination)
    report.problems = verify_copy(images, source, destination)
    return report


def copy_leases(rows: list[LeaseRow], destination: ImageStore) -> int:
    """Write the lease rows as they are (holder, expiry), so a lease a running call holds in the source still
    protects its image in the destination until it expires. Returns how many."""
    for row in rows:
        destination.catalog.take_leases(
            row.holder, [row.image_id], expires_at=row.expires_at, require_stored=False
        )
    return len(rows)


def copy_verdicts(images: list[StoredImage], source: ImageStore, destination: ImageStore) -> int:
    """Copy each image's verdicts (standing and kept notes, oldest first, with their times), one transaction per
    image, onto images that have none in the destination yet. Reads `_PAGE` images' verdicts at a time (each image
    keeps at most VERDICT_HISTORY_PER_IMAGE + 1 records), so memory stays bounded. Returns how many records."""
    copied = 0
    for start in range(0, len(images), _PAGE):
        chunk = [i.image_id for i in images[start : start + _PAGE]]
        for image_id, shown in _verdicts_of(source, chunk).items():
            copied += destination.catalog.copy_verdicts(
                image_id, _oldest_first(shown), keep=VERDICT_HISTORY_PER_IMAGE
            )
    return copied


def verify_copy(images: list[StoredImage], source: ImageStore, destination: ImageStore) -> list[str]:
    """Compare every source image with the destination's: the row's fields, its verdicts and the PNG's SHA-256.
    Returns the differences found, one sentence each (empty: equal)."""
    problems: list[str] = []
    for start in range(0, len(images), _PAGE):
        chunk = [i.image_id for i in images[start : start + _PAGE]]
        theirs, ours = _verdicts_of(source, chunk), _verdicts_of(destination, chunk)
        for image_id in chunk:
            if not _same_verdicts(theirs.get(image_id), ours.get(image_id)):
                problems.append(
                    f"{image_id}: its verdicts differ in the destination ({_summary(ours.get(image_id))} there, "
                    f"{_summary(theirs.get(image_id))} here): verdicts recorded there before the copy, or here "
                    "while it ran, are not merged; copy into an empty store to carry them"
                )
    for image in images:
        there = destination.catalog.get(image.image_id)
        if there is None:
            problems.append(f"{image.image_id} is missing from the destination")
            continue
        problems += [f"{image.image_id}: {why}" for why in _differences(image, there)]
        want = hashlib.sha256(source.blobs.get(image.blob_key)).hexdigest()
        try:
            got = hashlib.sha256(destination.blobs.get(there.blob_key)).hexdigest()
        except StoreError as e:
            problems.append(f"{image.image_id}: its PNG cannot be read from the destination ({e})")
            continue
        if got != want:
            problems.append(
                f"{image.image_id}: the PNG's SHA-256 differs ({got} in the destination, {want} here)"
            )
    return problems


def _verdicts_of(store: ImageStore, image_ids: list[str]) -> dict[str, Verdicts]:
    """Every kept verdict of these images (all their notes, not only the ones a listing shows)."""
    return store.catalog.verdicts(image_ids, notes=VERDICT_HISTORY_PER_IMAGE)


def _oldest_first(shown: Verdicts) -> list[VerdictRecord]:
    """The notes in their recorded order, oldest first, with the standing record placed among them by its time.
    The notes are never reordered by time (a clock stepped back must not change what a reader sees), and with a
    full history the standing one goes first: the source kept that many notes only because it was older than
    all of them, and placed later it would make the destination's trim drop the oldest note."""
    notes = list(reversed(shown.notes))
    if shown.standing is None:
        return notes
    at = 0 if len(notes) >= VERDICT_HISTORY_PER_IMAGE else sum(n.at <= shown.standing.at for n in notes)
    return [*notes[:at], shown.standing, *notes[at:]]


def _summary(shown: Verdicts | None) -> str:
    if shown is None:
        return "no verdicts"
    standing = f"standing {shown.standing.verdict}" if shown.standing else "no standing"
    return f"{standing}, {len(shown.notes)} notes"


def _same_verdicts(a: Verdicts | None, b: Verdicts | None) -> bool:
    if a is None or b is None:
        return a is b
    records_a = [a.standing, *a.notes]
    records_b = [b.standing, *b.notes]
    return len(records_a) == len(records_b) and all(
        (x is None and y is None)
        or (
            x is not None
            and y is not None
            and (x.verdict, x.reason) == (y.verdict, y.reason)
            and math.isclose(x.at, y.at, rel_tol=0.0, abs_tol=TIME_TOLERANCE_S)
        )
        for x, y in zip(records_a, records_b, strict=True)
    )


def _differences(a: StoredImage, b: StoredImage) -> list[str]:
    fields = ("width", "height", "size_bytes", "session", "parents", "recipe")
    found = [f"{name} differs" for name in fields if getattr(a, name) != getattr(b, name)]
    if not math.isclose(a.created_at, b.created_at, rel_tol=0.0, abs_tol=TIME_TOLERANCE_S):
        found.append(f"created_at differs ({a.created_at!r} vs {b.created_at!r})")
    return found


def _check_same(image: StoredImage, there: StoredImage, data: bytes, destination: ImageStore) -> None:
    """An id already in the destination (an earlier, interrupted copy) must be the same image."""
    why = _differences(image, there)
    try:
        same_bytes = destination.blobs.get(there.blob_key) == data
    except StoreError:
        same_bytes = False
    if why or not same_bytes:
        raise CopyConflictError(
            f"The destination {destination.catalog.location} already holds {image.image_id} as another image "
            f"({', '.join(why) or 'other PNG bytes'}). Copy into an empty store, or delete that image there."
        )
