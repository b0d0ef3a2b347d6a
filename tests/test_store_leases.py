"""Leases (klein_agent/service/store/leases.py, `Catalog.take_leases`): pins that hold across processes, expire when their holder dies, are
renewed while it lives and end when its call ends; and a picture whose parent is gone is still stored (issue 18,
point 6). Two `ImageStore`s on one folder are two catalog connections, as two processes are; the dead holder is
a real process killed with SIGKILL (tests/store_leaser.py)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from klein_agent.rules.limits import LEASE_TTL_S
from klein_agent.service.store import ImageStore, StoredImage, StoreError, UnknownImageError, new_image_id
from tests.store_writer import tiny_png

LEASER = Path(__file__).with_name("store_leaser.py")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def holder(root: Path) -> Iterator[ImageStore]:
    """The store of the process whose call holds leases."""
    with ImageStore(root) as store:
        yield store


def put(store: ImageStore, seed: int, **kwargs: object) -> StoredImage:
    return store.put(
        tiny_png(16, random.Random(seed)), width=16, height=16, recipe={"tool": "generate"}, **kwargs
    )


def fill(store: ImageStore, count: int, seed: int = 100) -> None:
    """Put `count` images through `store`: each put evicts what its bound requires."""
    for k in range(count):
        put(store, seed + k)


def lease_rows(root: Path) -> list[tuple[str, str, float]]:
    """Every lease row, read through the catalog interface of a read-only store (as another process would)."""
    with ImageStore(root, read_only=True) as reader:
        return [(r.image_id, r.holder, r.expires_at) for r in reader.catalog.lease_rows()]


def test_a_lease_holds_against_another_process_until_released(root: Path, holder: ImageStore) -> None:
    x = put(holder, 1)
    with ImageStore(root, max_images=2) as other:
        with holder.pinned([x.image_id]):
            fill(other, 6)
            assert other.exists(x.image_id), "another process evicted a leased image"
            assert other.stats().count == 2
        assert lease_rows(root) == [], "the lease outlived its block"
        fill(other, 2, seed=200)
        assert not other.exists(x.image_id), "a released image is evicted like any other"


def test_leases_are_counted_and_end_however_the_block_ends(root: Path, holder: ImageStore) -> None:
    x = put(holder, 1)
    with holder.pinned([x.image_id]):
        with pytest.raises(RuntimeError), holder.lease() as lease:
            lease.add([x.image_id])
            raise RuntimeError("the call failed")
        assert [row[0] for row in lease_rows(root)] == [x.image_id], "the outer lease must stay"
    assert lease_rows(root) == []
    with pytest.raises(UnknownImageError), holder.pinned([x.image_id, new_image_id()]):
        pass
    assert lease_rows(root) == [], "a refused lease leaves nothing"
    holder.pinned([x.image_id])
    holder.close()
    assert lease_rows(root) == [], "closing a store releases its leases"


def test_an_expired_lease_is_ignored_and_purged(root: Path, holder: ImageStore) -> None:
    x = put(holder, 1)
    holder.pinned([x.image_id])
    (expires_at,) = [row[2] for row in lease_rows(root)]
    assert time.time() < expires_at <= time.time() + holder.lease_ttl_s
    before = expires_at - 1.0  # the other process's clock, one second before the lease expires
    with ImageStore(root, max_images=2, clock=lambda: before) as other:
        fill(other, 3)
        assert other.exists(x.image_id)
    after = expires_at + 1.0
    with ImageStore(root, max_images=2, clock=lambda: after) as other:
        assert lease_rows(root) == [], "an open purges expired leases"
        fill(other, 2, seed=200)
        assert not other.exists(x.image_id), "an expired lease still protected its image"


def test_renewal_moves_the_expiry_and_keeps_the_image(root: Path) -> None:
    start = time.time()
    shift = [0.0]
    with ImageStore(root, clock=lambda: start + shift[0]) as holder:
        x = put(holder, 1)
        holder.pinned([x.image_id])
        assert [row[2] for row in lease_rows(root)] == [start + holder.lease_ttl_s]
        shift[0] = 100.0
        holder.renew_leases()
        assert [row[2] for row in lease_rows(root)] == [(start + 100.0) + holder.lease_ttl_s]
        past_first_expiry = start + holder.lease_ttl_s + 1.0
        with ImageStore(root, max_images=2, clock=lambda: past_first_expiry) as other:
            fill(other, 3)
            assert other.exists(x.image_id), "a renewed lease was treated as expired"


def test_the_store_renews_its_leases_on_its_own(root: Path) -> None:
    with ImageStore(root, lease_ttl_s=30.0, lease_renew_s=0.05) as holder:
        x = put(holder, 1)
        holder.pinned([x.image_id])
        (first,) = [row[2] for row in lease_rows(root)]
        deadline = time.monotonic() + 20
        while lease_rows(root)[0][2] <= first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)


def test_a_killed_holders_lease_holds_until_it_expires_then_is_ignored(
    root: Path, holder: ImageStore
) -> None:
    x = put(holder, 1)
    holder.close()
    with subprocess.Popen(
        [sys.executable, str(LEASER), str(root), x.image_id], cwd=REPO, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "leased\n"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    ((image_id, _, expires_at),) = lease_rows(root)
    assert image_id == x.image_id and expires_at > time.time()
    with ImageStore(root, max_images=2) as other:  # before the expiry: held, as if the call still ran
        fill(other, 3)
        assert other.exists(x.image_id)
    later = expires_at + 1.0
    with ImageStore(root, max_images=2, clock=lambda: later) as other:
        assert lease_rows(root) == [], "an open purges expired leases"
        fill(other, 2, seed=200)
        assert not other.exists(x.image_id), "a dead process's expired lease still protected its image"


def test_a_lease_may_wait_for_an_image_stored_later(root: Path, holder: ImageStore) -> None:
    coming = new_image_id()
    with holder.lease() as lease:
        with pytest.raises(UnknownImageError):
            lease.add([coming])  # by default a lease is for stored images
        lease.add([coming], require_stored=False)
        put(holder, 1, image_id=coming)
        with ImageStore(root, max_images=2) as other:
            fill(other, 3)
            assert other.exists(coming)


def test_a_parent_that_is_gone_is_kept_in_the_lineage(holder: ImageStore) -> None:
    kept = put(holder, 1)
    gone = put(holder, 2)
    holder.delete(gone.image_id)
    child = put(holder, 3, parents=[gone.image_id, kept.image_id])
    assert holder.get(child.image_id).parents == (gone.image_id, kept.image_id)
    assert holder.absent([gone.image_id, kept.image_id, gone.image_id, "../x"]) == [gone.image_id, "../x"]


def test_lease_settings_and_a_read_only_store(root: Path, holder: ImageStore) -> None:
    assert holder.lease_ttl_s == LEASE_TTL_S
    with pytest.raises(ValueError, match="lease_renew_s"):
        ImageStore(root, lease_ttl_s=1.0, lease_renew_s=1.0)
    with ImageStore(root, read_only=True) as reader, pytest.raises(StoreError, match="read-only"):
        reader.lease()


def test_a_call_that_leases_nothing_writes_no_lease_transaction(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every model call opens a lease; most (a prompt alone) hold no image. Those must cost no catalog write:
    # two write transactions per call were the server's +1.7 ms CPU per call (docs/benchmarks.md, issue 19).
    with ImageStore(root) as store:
        writes: list[str] = []
        for name in ("take_leases", "release_leases"):
            real = getattr(store.catalog, name)
            monkeypatch.setattr(
                store.catalog, name, lambda *a, _n=name, _r=real, **k: (writes.append(_n), _r(*a, **k))[1]
            )
        with store.lease() as lease:
            lease.add([])
        assert writes == []
        image_id = put(store, 1).image_id
        with store.lease() as lease:
            lease.add([image_id])
        assert writes == ["take_leases", "release_leases"]
