"""Idempotency keys: a call retried with the same key (a client's retry after a front-end died, a replica's retry)
returns the pictures stored the first time and stores nothing twice, in both catalogs.

The store tests run over every backend of tests/store_backends.py (PostgreSQL + S3 in the contained child pytest
of tests/test_store_scaleout.py); the studio tests run a real engine over the embedded store.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from klein_agent.rules.calls import Edit, Generate, check_call_id, new_call_id, picture_keys
from klein_agent.rules.limits import CALL_ID_MAX_CHARS
from klein_agent.rules.resolution import RequestError
from klein_agent.service.store import ImageStore, StoredImage, new_image_id
from klein_agent.service.store.records import StoreWriteError
from klein_agent.service.studio import Studio
from tests.conftest import make_server_state
from tests.fakes import FakeGenerator, data_uri, png_bytes
from tests.store_backends import BACKENDS
from tests.store_writer import tiny_png

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=sorted(BACKENDS))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], ImageStore]]:
    opened: list[ImageStore] = []

    def make() -> ImageStore:
        store = BACKENDS[request.param](tmp_path / "store")
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def put(store: ImageStore, seed: int, call_key: str | None) -> StoredImage:
    return store.put(
        tiny_png(16, random.Random(seed)), width=16, height=16, recipe={"seed": seed}, call_key=call_key
    )


def blob_count(store: ImageStore) -> int:
    return len(list(store.blobs.inventory()))


# ---- the store: one row per call key, in both catalogs ---------------------------------------------------------


def test_a_picture_put_again_with_its_call_key_returns_the_stored_row_and_writes_nothing(
    open_store: Callable[[], ImageStore],
) -> None:
    store = open_store()
    first = put(store, 1, "k#0")
    again = put(store, 2, "k#0")  # other bytes: a retry whose model run gave another picture
    assert again.image_id == first.image_id
    assert store.read_png(first.image_id) == tiny_png(16, random.Random(1))
    assert store.stats().count == 1 and blob_count(store) == 1
    other = put(store, 3, "k#1")  # another picture of the call, and keyless puts, are stored as ever
    assert other.image_id != first.image_id
    put(store, 4, None)
    put(store, 5, None)
    assert store.stats().count == 4 and blob_count(store) == 4
    assert set(store.find_calls(["k#0", "k#1", "k#2"])) == {"k#0", "k#1"}


def test_two_front_ends_inserting_one_call_key_at_once_store_one_row_and_no_orphan(
    open_store: Callable[[], ImageStore],
) -> None:
    """Both front-ends looked before either committed (their find_calls saw nothing): the catalog's unique key
    decides, the loser's blob is deleted and it returns the winner's row."""
    one, two = open_store(), open_store()
    won = put(one, 1, "race#0")
    two.catalog.find_calls = lambda keys: {}  # type: ignore[method-assign]  # it looked before `one` committed
    lost = put(two, 2, "race#0")
    assert lost.image_id == won.image_id
    assert one.stats().count == 1 and blob_count(one) == 1  # the loser's blob is gone, not an orphan to sweep


def test_concurrent_puts_of_one_call_key_from_two_stores_leave_one_row(
    open_store: Callable[[], ImageStore],
) -> None:
    stores = [open_store(), open_store()]
    results: list[str] = []
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        results.append(put(stores[n % 2], n, "burst#0").image_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8 and len(set(results)) == 1
    assert stores[0].stats().count == 1 and blob_count(stores[0]) == 1


# ---- the rule: what a key is ------------------------------------------------------------------------------------


def test_a_key_names_a_call_with_its_arguments_picture_by_picture() -> None:
    call = Generate(prompt="a red cube", num_images=3, call_id="retry-1")
    keys = picture_keys(call)
    assert keys is not None and len(keys) == 3 and len(set(keys)) == 3
    assert picture_keys(Generate(prompt="a red cube", num_images=3, call_id="retry-1")) == keys
    assert picture_keys(Generate(prompt="a blue cube", num_images=3, call_id="retry-1")) != keys
    assert picture_keys(Generate(prompt="a red cube", num_images=3, call_id="retry-2")) != keys
    assert picture_keys(Generate(prompt="a red cube", num_images=3)) is None
    assert "retry-1" not in "".join(keys)  # the client's key itself is not stored
    assert new_call_id() != new_call_id()
    check_call_id(new_call_id())


@pytest.mark.parametrize("bad", ["", "has space", "x" * (CALL_ID_MAX_CHARS + 1), "a#b", 42, ["k"]])
def test_a_malformed_key_is_refused_with_what_to_send(bad: object) -> None:
    with pytest.raises(
        RequestError, match=r"idempotency key .* \(_meta 'klein-agent/idempotency-key'\).*UUID"
    ):
        Generate(prompt="x", call_id=bad).check()  # type: ignore[arg-type]
    with pytest.raises(RequestError) as raised:
        check_call_id(bad)
    assert len(str(raised.value)) < 300  # a huge key is not echoed whole


# ---- the studio: a retry costs no model time and stores nothing -------------------------------------------------


def studio_with(tmp_path: Path, input_dir: Path, fake: FakeGenerator) -> Studio:
    return make_server_state(lambda: fake, tmp_path / "store", input_dir)  # type: ignore[no-any-return]


async def test_a_retried_call_returns_the_first_attempts_images_without_running_the_model(
    tmp_path: Path, input_dir: Path
) -> None:
    fake = FakeGenerator()
    studio = studio_with(tmp_path, input_dir, fake)
    picture = data_uri(png_bytes(96, 64))
    try:
        call = Edit(prompt="night", image=picture, num_images=2, seed=5, call_id="client-key-1")
        first = await studio.make(call)
        count = studio.store.stats().count  # 2 pictures + the imported input
        again = await studio.make(call)
        assert [i.image_id for i in again.images] == [i.image_id for i in first.images]
        assert again.parents == first.parents and again.seeds == [5, 6]
        assert again.preview.data == first.preview.data  # the same pictures shown
        assert len(fake.calls) == 1 and studio.store.stats().count == count == 3
        fresh = await studio.make(
            Edit(prompt="night", image=picture, num_images=2, seed=5, call_id="other-key")
        )
        assert len(fake.calls) == 2 and not {i.image_id for i in fresh.images} & {
            i.image_id for i in first.images
        }
    finally:
        studio.engine.close()
        studio.store.close()


async def test_a_retry_after_a_death_between_two_pictures_stores_only_the_missing_one(
    tmp_path: Path, input_dir: Path
) -> None:
    fake = FakeGenerator()
    studio = studio_with(tmp_path, input_dir, fake)
    real_put = studio.store.put
    puts: list[int] = []

    def dies_at_the_second_picture(*args: Any, **kwargs: Any) -> StoredImage:
        puts.append(1)
        if len(puts) == 2:
            raise StoreWriteError("the front-end died here (test)")
        return real_put(*args, **kwargs)

    try:
        call = Generate(prompt="a cube", width=64, height=64, seed=9, num_images=2, call_id="half-stored")
        studio.store.put = dies_at_the_second_picture  # type: ignore[method-assign]
        with pytest.raises(StoreWriteError):
            await studio.make(call)
        studio.store.put = real_put  # type: ignore[method-assign]
        (kept,) = studio.store.list_images()[0]
        retried = await studio.make(call)
        assert len(fake.calls) == 2  # a picture was missing: the model ran again
        assert retried.images[0].image_id == kept.image_id  # picture 1 kept, not stored twice
        assert studio.store.stats().count == 2
        assert len(studio.store.find_calls(picture_keys(call) or [])) == 2
    finally:
        studio.engine.close()
        studio.store.close()


async def test_a_call_without_a_key_is_stored_under_a_fresh_one_without_a_lookup(
    tmp_path: Path, input_dir: Path
) -> None:
    fake = FakeGenerator()
    studio = studio_with(tmp_path, input_dir, fake)
    looked_up: list[list[str]] = []
    real_find = studio.store.catalog.find_calls

    def find_calls(keys: list[str]) -> Any:
        looked_up.append(list(keys))
        return real_find(keys)

    studio.store.catalog.find_calls = find_calls  # type: ignore[method-assign]
    try:
        call = Generate(prompt="a cube", width=64, height=64, seed=9)
        first, second = await studio.make(call), await studio.make(call)
        assert len(fake.calls) == 2  # no key: the same arguments are two calls
        assert first.images[0].image_id != second.images[0].image_id
        # each was stored under a key of its own (a retried insert stores it once), and no earlier attempt of a
        # fresh key was looked for before the model ran (only `put`'s own check, after it)
        assert len(looked_up) == 2 and all(len(keys) == 1 for keys in looked_up)
        assert looked_up[0] != looked_up[1]
        assert len(studio.store.find_calls(looked_up[0] + looked_up[1])) == 2
    finally:
        studio.engine.close()
        studio.store.close()


async def test_the_same_key_sent_twice_at_once_stores_each_picture_once(
    tmp_path: Path, input_dir: Path
) -> None:
    fake = FakeGenerator()
    studio = studio_with(tmp_path, input_dir, fake)
    try:
        call = Generate(prompt="twins", width=64, height=64, seed=1, call_id="at-once")
        results = []

        async def one() -> None:
            results.append(await studio.make(call))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        assert results[0].images[0].image_id == results[1].images[0].image_id
        assert studio.store.stats().count == 1 and len(list(studio.store.blobs.inventory())) == 1
    finally:
        studio.engine.close()
        studio.store.close()


def test_an_unused_id_is_still_refused_as_stored_already_when_it_is(
    open_store: Callable[[], ImageStore],
) -> None:
    """The call key does not weaken the id check: an id stored already is refused whatever the key."""
    store = open_store()
    given = new_image_id()
    store.put(tiny_png(16, random.Random(1)), width=16, height=16, recipe={}, image_id=given)
    with pytest.raises(ValueError, match="stored already"):
        store.put(
            tiny_png(16, random.Random(2)), width=16, height=16, recipe={}, image_id=given, call_key="n#0"
        )
