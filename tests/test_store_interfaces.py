"""The store's promises, tested through `ImageStore` over the `Catalog` and `BlobStore` interfaces only (no SQL, no
file names): parametrized over tests/store_backends.py: SQLite + a folder here, and PostgreSQL + S3 in the
private-network child pytest that tests/test_store_scaleout.py starts (with its servers).

Blob first, row second (a process killed in between leaves a blob without a row, which is swept; never a row
without its blob); eviction never removes a leased image; cursor pages are stable under inserts; ids are unique;
migrations run once, also when two processes open a new store at once; verdicts: the latest pick or reject is the
standing, notes add up, the history is bounded, and verdicts go with their image.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from klein_agent.rules.limits import VERDICT_HISTORY_PER_IMAGE, VERDICT_NOTES_SHOWN, VERDICT_REASON_MAX_CHARS
from klein_agent.rules.resolution import RequestError
from klein_agent.service.store import ImageStore, StoredImage, StoreFullError, UnknownImageError, new_image_id
from klein_agent.service.store.blobs import BlobMissingError
from klein_agent.service.store.migrations import Migration
from klein_agent.service.store.records import StoreWriteError, VerdictRecord, blob_key
from tests.store_backends import BACKENDS, MIGRATIONS
from tests.store_servers import NETNS_ENV, PG_ADMIN_ENV, S3_ENDPOINT_ENV
from tests.store_writer import tiny_png

CHILD = Path(__file__).with_name("store_interface_child.py")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(backend: str, tmp_path: Path) -> Iterator[Callable[..., ImageStore]]:
    opened: list[ImageStore] = []

    def make(**options: object) -> ImageStore:
        store = BACKENDS[backend](tmp_path / "store", **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def put(store: ImageStore, seed: int, **kwargs: object) -> StoredImage:
    return store.put(tiny_png(16, random.Random(seed)), width=16, height=16, recipe={"seed": seed}, **kwargs)


def every_row_has_its_blob(store: ImageStore) -> list[str]:
    """The invariant, through the interfaces: every listed row's blob is there, whole. Returns the ids."""
    ids = []
    page, cursor = store.list_images(limit=100)
    while True:
        for image in page:
            assert store.blobs.size(image.blob_key) == image.size_bytes, f"row {image.image_id} has no blob"
            assert len(store.read_png(image.image_id)) == image.size_bytes
            ids.append(image.image_id)
        if cursor is None:
            return ids
        page, cursor = store.list_images(limit=100, cursor=cursor)


def run_child(backend: str, root: Path, what: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    env |= {k: os.environ[k] for k in (NETNS_ENV, PG_ADMIN_ENV, S3_ENDPOINT_ENV) if k in os.environ}
    return subprocess.Popen(
        [sys.executable, str(CHILD), backend, str(root), what, *extra], env=env, stderr=subprocess.PIPE
    )


@pytest.mark.parametrize("kill_at", ["between-blob-and-row", "between-row-and-blob"])
def test_a_kill_between_blob_and_row_leaves_an_orphan_blob_that_is_swept(
    backend: str, open_store: Callable[..., ImageStore], tmp_path: Path, kill_at: str
) -> None:
    with open_store() as store:
        kept = put(store, 1)
        if kill_at == "between-row-and-blob":
            store.delete(kept.image_id)  # the child deletes a second image, the only one then stored
            kept = put(store, 2)
    child = run_child(backend, tmp_path / "store", kill_at)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -9, err.decode()
    with open_store() as store:
        # the sweep at open (this process is alone on the store) removed the blob without a row
        blobs = store.blobs.inventory()
        rows = every_row_has_its_blob(store)
        assert set(blobs) == {blob_key(i) for i in rows}, "an orphan blob survived the sweep"
        if kill_at == "between-blob-and-row":
            assert rows == [kept.image_id] and len(blobs) == 1
        else:
            assert rows == [] and blobs == {}


def test_a_failed_blob_write_stores_no_row(
    open_store: Callable[..., ImageStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    from klein_agent.service.store import StoreWriteError

    store = open_store()
    first = put(store, 1)

    def refuse(key: str, data: bytes) -> None:
        raise StoreWriteError("the blob store refused the write (test)")

    monkeypatch.setattr(store.blobs, "put", refuse)
    with pytest.raises(StoreWriteError):
        put(store, 2)
    monkeypatch.undo()
    assert every_row_has_its_blob(store) == [first.image_id]


def test_a_row_whose_blob_vanished_is_never_served_and_is_dropped_at_open(
    open_store: Callable[..., ImageStore],
) -> None:
    store = open_store()
    lost, kept = put(store, 1), put(store, 2)
    store.blobs.delete(lost.blob_key)  # behind the store's back (a disk error, a hand edit)
    with pytest.raises(BlobMissingError):
        store.blobs.get(lost.blob_key)
    with pytest.raises(LookupError):
        store.read_png(lost.image_id)
    store.close()
    with open_store() as reopened:
        assert every_row_has_its_blob(reopened) == [kept.image_id]


def test_eviction_never_removes_a_leased_image(open_store: Callable[..., ImageStore]) -> None:
    store = open_store(max_images=3)
    oldest = put(store, 0)
    with store.pinned([oldest.image_id]):
        for seed in range(1, 10):
            put(store, seed)
            assert store.exists(oldest.image_id), f"the leased image was evicted by put {seed}"
        assert store.stats().count == 3
        others = [i.image_id for i in store.list_images()[0] if i.image_id != oldest.image_id]  # not a use
        with store.pinned(others), pytest.raises(StoreFullError):
            put(store, 99)  # every image is leased: nothing may go
    put(store, 100)  # released: now the oldest is the least recently used and goes
    assert not store.exists(oldest.image_id)
    assert len(every_row_has_its_blob(store)) == 3
    assert store.blobs.size(oldest.blob_key) is None, "an evicted image's blob is deleted"


def test_a_lease_taken_in_another_store_holds_against_eviction_here(
    open_store: Callable[..., ImageStore],
) -> None:
    first = open_store(max_images=2)
    leased = put(first, 0)
    with first.pinned([leased.image_id]):
        second = open_store(max_images=2)  # another front-end on the same catalog and blobs
        for seed in range(1, 6):
            put(second, seed)
        assert second.exists(leased.image_id)


def test_cursor_pages_are_stable_under_inserts(open_store: Callable[..., ImageStore]) -> None:
    store = open_store()
    before = [put(store, seed, session="s").image_id for seed in range(7)]
    seen: list[str] = []
    page, cursor = store.list_images(session="s", limit=3)
    seed = 100
    while True:
        seen += [image.image_id for image in page]
        put(store, seed, session="s")  # a newer image arrives between pages
        put(store, seed + 1)  # and one in another session
        seed += 2
        if cursor is None:
            break
        page, cursor = store.list_images(session="s", limit=3, cursor=cursor)
    assert seen == before[::-1], "pages repeated or skipped an image while others were stored"


def test_ids_are_unique_and_an_id_is_never_stored_twice(open_store: Callable[..., ImageStore]) -> None:
    store = open_store()
    ids = {put(store, seed).image_id for seed in range(50)}
    assert len(ids) == 50
    given = new_image_id()
    first = put(store, 1, image_id=given)
    with pytest.raises(ValueError, match="stored already"):
        put(store, 2, image_id=given)
    assert store.read_png(given) == tiny_png(16, random.Random(1)), (
        "the second put replaced the first's bytes"
    )
    assert store.get(given) == first


def test_migrations_run_once_when_two_processes_open_a_new_store_at_once(
    backend: str, open_store: Callable[..., ImageStore], tmp_path: Path
) -> None:
    go = tmp_path / "go"
    children = [run_child(backend, tmp_path / "store", "open-at", str(go)) for _ in range(2)]
    time.sleep(1.0)  # both children are importing, then waiting for the go file
    go.touch()
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
    with open_store() as store:
        assert store.catalog.schema_versions() == [m.version for m in MIGRATIONS[backend].MIGRATIONS]


def test_migrations_are_idempotent_across_opens(
    backend: str, open_store: Callable[..., ImageStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = MIGRATIONS[backend]
    steps = list(module.MIGRATIONS)
    with open_store() as store:
        image = put(store, 1)
    runs: list[int] = []
    probe = Migration(len(steps) + 1, "probe", lambda execute: runs.append(1))
    monkeypatch.setattr(module, "MIGRATIONS", [*steps, probe])
    for _ in range(3):
        with open_store() as store:
            assert store.get(image.image_id) == image
            assert store.catalog.schema_versions() == [m.version for m in [*steps, probe]]
    assert runs == [1], "a migration ran more than once"


def test_verdicts_latest_standing_wins_notes_add_up_and_history_is_bounded(
    open_store: Callable[..., ImageStore],
) -> None:
    store = open_store()
    image, other = put(store, 1), put(store, 2)
    assert store.verdicts([image.image_id, other.image_id]) == {}
    store.record_verdict(image.image_id, "pick", "  sharp\n hands ")
    store.record_verdict(image.image_id, "note", "sky a bit flat")
    shown = store.verdicts([image.image_id, other.image_id])
    assert list(shown) == [image.image_id], "an image without verdicts is absent"
    standing = shown[image.image_id].standing
    assert standing is not None and (standing.verdict, standing.reason) == ("pick", "sharp hands")
    assert [n.reason for n in shown[image.image_id].notes] == ["sky a bit flat"]
    store.record_verdict(image.image_id, "reject", "six fingers")  # the latest pick or reject wins
    standing = store.verdicts([image.image_id])[image.image_id].standing
    assert standing is not None and (standing.verdict, standing.reason) == ("reject", "six fingers")
    store.record_verdict(image.image_id, "pick", "")  # a reason is optional for pick and reject
    for k in range(VERDICT_HISTORY_PER_IMAGE * 2):  # far more notes than the history keeps
        store.record_verdict(image.image_id, "note", f"note {k}")
    shown = store.verdicts([image.image_id])
    standing = shown[image.image_id].standing
    assert standing is not None and standing.verdict == "pick", "notes never push the standing pick out"
    last = VERDICT_HISTORY_PER_IMAGE * 2 - 1
    assert [n.reason for n in shown[image.image_id].notes] == [
        f"note {last - k}" for k in range(VERDICT_NOTES_SHOWN)
    ]
    kept = store.catalog.verdicts([image.image_id], notes=10_000)[image.image_id]
    assert len(kept.notes) + 1 == VERDICT_HISTORY_PER_IMAGE + 1, "the newest notes plus the standing pick"
    store.close()
    with open_store() as reopened:  # durable
        again = reopened.verdicts([image.image_id])[image.image_id]
        assert again == shown[image.image_id]


def test_verdicts_are_refused_for_unknown_ids_and_bad_values_and_recorded_nowhere(
    open_store: Callable[..., ImageStore],
) -> None:
    store = open_store()
    image = put(store, 1)
    for unknown in (new_image_id(), "img_short", "../../etc/passwd", ""):
        with pytest.raises(UnknownImageError, match="Unknown image id"):
            store.record_verdict(unknown, "pick", "x")
    with pytest.raises(RequestError, match="verdict must be one of pick, reject, note, got 'love'"):
        store.record_verdict(image.image_id, "love", "x")
    with pytest.raises(RequestError, match="a note needs a reason"):
        store.record_verdict(image.image_id, "note", " \n\t")
    with pytest.raises(RequestError, match=f"reason is {VERDICT_REASON_MAX_CHARS + 1} characters; at most"):
        store.record_verdict(image.image_id, "pick", "x" * (VERDICT_REASON_MAX_CHARS + 1))
    assert store.verdicts([image.image_id]) == {}


def test_verdicts_go_with_their_image_and_filter_the_listing(open_store: Callable[..., ImageStore]) -> None:
    store = open_store(max_images=4)
    images = [put(store, seed, session="s") for seed in range(4)]
    for image in images[1:]:
        store.record_verdict(image.image_id, "pick", f"seed {image.recipe['seed']}")
    store.record_verdict(images[3].image_id, "reject", "on second look")
    page, cursor = store.list_images(session="s", limit=1, standing="pick")
    seen = [i.image_id for i in page]
    while cursor is not None:
        page, cursor = store.list_images(session="s", limit=1, cursor=cursor, standing="pick")
        seen += [i.image_id for i in page]
    assert seen == [images[2].image_id, images[1].image_id], "newest first, only the standing picks"
    assert [i.image_id for i in store.list_images(standing="reject")[0]] == [images[3].image_id]
    with pytest.raises(ValueError, match="standing must be one of pick, reject"):
        store.list_images(standing="note")
    store.delete(images[1].image_id)
    for seed in range(10, 14):  # evicts every earlier image, least recently used first
        put(store, seed)
    gone = [i.image_id for i in images]
    assert store.verdicts(gone) == {}, "a verdict outlived its image"
    assert store.catalog.verdicts(gone, notes=100) == {}
    assert store.list_images(standing="pick")[0] == []


def test_copied_verdicts_keep_their_order_and_times_are_trimmed_and_all_or_nothing(
    open_store: Callable[..., ImageStore],
) -> None:
    store = open_store()
    image, other, third = put(store, 1), put(store, 2), put(store, 3)
    # times that are binary fractions of a second: exact in a float and in PostgreSQL's microseconds
    history = [
        VerdictRecord(image.image_id, "note", "first look", 1_700_000_000.0),
        VerdictRecord(image.image_id, "pick", "sharp", 1_700_000_001.5),
        VerdictRecord(image.image_id, "note", "second look", 1_700_000_002.25),
    ]
    assert store.catalog.copy_verdicts(image.image_id, history, keep=VERDICT_HISTORY_PER_IMAGE) == 3
    copied = store.catalog.verdicts([image.image_id], notes=100)[image.image_id]
    assert copied.standing == history[1] and copied.notes == (history[2], history[0])
    again = [VerdictRecord(image.image_id, "reject", "rerun", 1_700_000_009.0)]
    assert store.catalog.copy_verdicts(image.image_id, again, keep=VERDICT_HISTORY_PER_IMAGE) == 0
    assert store.catalog.verdicts([image.image_id], notes=100)[image.image_id] == copied, (
        "a rerun doubled them"
    )

    pick = VerdictRecord(other.image_id, "pick", "old pick", 1_700_000_000.0)
    notes = [VerdictRecord(other.image_id, "note", f"n{k}", 1_700_000_001.0 + k) for k in range(5)]
    assert store.catalog.copy_verdicts(other.image_id, [pick, *notes], keep=3) == 6
    trimmed = store.catalog.verdicts([other.image_id], notes=100)[other.image_id]
    assert trimmed.standing == pick, "the trim dropped the standing pick"
    assert [n.reason for n in trimmed.notes] == ["n4", "n3", "n2"]

    bad = [*history[:2], VerdictRecord(third.image_id, "love", "not a verdict", 1_700_000_003.0)]
    with pytest.raises(StoreWriteError):
        store.catalog.copy_verdicts(third.image_id, bad, keep=VERDICT_HISTORY_PER_IMAGE)
    assert store.verdicts([third.image_id]) == {}, "a failed copy left part of a history"
    with pytest.raises(UnknownImageError):
        store.catalog.copy_verdicts(new_image_id(), history, keep=VERDICT_HISTORY_PER_IMAGE)


def test_the_verdict_mark_pages_what_changed_from_any_front_end_bounded_by_the_limit(
    open_store: Callable[..., ImageStore],
) -> None:
    store = open_store()
    other = open_store()  # another front-end on the same catalog: its verdicts move this one's mark
    a, b, c = (put(store, seed) for seed in range(3))
    start = store.verdict_mark()
    assert store.verdict_changes(start, limit=10) == ([], {}, start), "nothing recorded since"
    store.record_verdict(a.image_id, "pick", "sharp")
    other.record_verdict(b.image_id, "note", "sky flat")
    other.record_verdict(a.image_id, "reject", "six fingers")
    store.record_verdict(c.image_id, "note", "good light")
    head = store.verdict_mark()
    assert head > start and other.verdict_mark() == head
    ids, verdicts, mark = store.verdict_changes(start, limit=2)  # two records: a's pick, b's note
    assert ids == [a.image_id, b.image_id] and start < mark < head
    standing = verdicts[a.image_id].standing  # what the image's verdicts are now, not the record read
    assert standing is not None and (standing.verdict, standing.reason) == ("reject", "six fingers")
    assert [n.reason for n in verdicts[b.image_id].notes] == ["sky flat"]
    ids, verdicts, mark = store.verdict_changes(mark, limit=2)
    assert ids == [a.image_id, c.image_id] and mark == head and set(verdicts) == set(ids)
    assert store.verdict_changes(head, limit=2) == ([], {}, head)
    store.delete(c.image_id)  # its verdicts go with it, the newest record included
    assert store.verdict_changes(start, limit=10)[0] == [a.image_id, b.image_id], "an evicted image is absent"
    store.record_verdict(b.image_id, "pick", "")
    assert store.verdict_mark() > head, "a mark is never reused, even after the newest record was deleted"
    assert store.verdict_changes(head, limit=10)[0] == [b.image_id]
