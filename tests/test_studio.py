"""The domain layer on its own, without MCP: what a call makes and stores, and when it stores nothing.

Storing is the studio's, off the engine's thread: the next call runs while the last one is being written, a
call refused, failed or cancelled before storing leaves the store as it was (inputs included), and a batch
whose storing has begun is stored whole even if its caller is cancelled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from klein_agent.rules import limits
from klein_agent.rules.calls import Compose, Edit, Generate
from klein_agent.rules.resolution import RequestError
from klein_agent.service.engine import EngineBusyError, GenerationFailedError
from klein_agent.service.studio import Studio
from tests.conftest import make_server_state
from tests.fakes import FakeGenerator, data_uri, png_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def studio(tiny_pipeline: Any, tmp_path: Path, input_dir: Path) -> Iterator[Studio]:
    made = make_server_state(lambda: tiny_pipeline, tmp_path / "store", input_dir)
    yield made
    made.engine.close()
    made.store.close()


def faked(tmp_path: Path, input_dir: Path, fake: FakeGenerator, **options: Any) -> Studio:
    return make_server_state(lambda: fake, tmp_path / "store", input_dir, **options)  # type: ignore[no-any-return]


async def test_generate_edit_and_compose_with_lineage_and_recipes(studio: Studio, input_dir: Path) -> None:
    first = await studio.make(Generate(prompt="a red cube", width=64, height=64, seed=3, num_images=2))
    assert [img.width for img in first.images] == [64, 64] and first.seeds == [3, 4]
    assert first.parents == [] and first.imported == [] and first.run is not None
    assert first.run.guidance is None and first.run.steps == limits.DISTILLED_STEPS
    recipe = first.images[1].recipe
    assert (recipe["tool"], recipe["seed"], recipe["batch"]) == (
        "generate",
        4,
        {"index": 1, "of": 2, "first_seed": 3},
    )

    photo = input_dir / "photo.png"
    photo.write_bytes(png_bytes(100, 70))
    edited = await studio.make(Edit(prompt="make it blue", image=str(photo), seed=1))
    (imported,) = edited.imported
    assert edited.parents == [imported.image_id] and imported.recipe["tool"] == "import"
    assert (edited.images[0].width, edited.images[0].height) == (96, 64)  # the input as prepared

    composed = await studio.make(
        Compose(
            prompt="image 1 beside image 2",
            images=[first.images[0].image_id, f"image://{edited.images[0].image_id}"],
        )
    )
    assert composed.parents == [first.images[0].image_id, edited.images[0].image_id]
    assert composed.images[0].parents == tuple(composed.parents)
    sheet = await studio.contact_sheet([i.image_id for i in composed.images + first.images], max_edge=256)
    assert [i.image_id for i in sheet.images] == [i.image_id for i in composed.images + first.images]


async def test_bad_arguments_are_refused_before_any_work(studio: Studio, tiny_spy: Any) -> None:
    for kwargs, message in [
        ({"prompt": " "}, "prompt is empty"),
        ({"prompt": "x", "seed": 2**32 - 1, "num_images": 2}, "use a seed of at most"),
        ({"prompt": "x", "width": 2048, "height": 2048, "num_images": 2}, "megapixel limit"),
        ({"prompt": "x", "session": "a/b"}, "not a valid label"),
        ({"prompt": "x", "steps": 0}, "steps must be from 1"),
    ]:
        with pytest.raises(RequestError, match=message):
            await studio.make(Generate(**kwargs))
    assert studio.store.stats().count == 0


async def test_the_next_call_runs_while_the_last_one_is_stored(tmp_path: Path, input_dir: Path) -> None:
    fake = FakeGenerator()
    studio = faked(tmp_path, input_dir, fake)
    real_put = studio.store.put
    second_started_while_storing = threading.Event()

    def slow_put(*args: Any, **kwargs: Any) -> Any:
        if (
            kwargs["recipe"]["prompt"] == "first"
        ):  # hold the first picture until the engine takes the second call
            deadline = time.monotonic() + 10
            while len(fake.calls) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            if len(fake.calls) == 2:
                second_started_while_storing.set()
        return real_put(*args, **kwargs)

    studio.store.put = slow_put  # type: ignore[method-assign]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: studio.make(Generate(prompt="first", width=64, height=64, seed=1)))
            await anyio.sleep(0.05)
            tg.start_soon(lambda: studio.make(Generate(prompt="second", width=64, height=64, seed=2)))
        assert second_started_while_storing.is_set(), "the engine waited for the first call's store write"
        assert studio.store.stats().count == 2
    finally:
        studio.engine.close()
        studio.store.close()


async def test_a_refused_or_failed_call_imports_nothing(tmp_path: Path, input_dir: Path) -> None:
    fake = FakeGenerator(gate=threading.Event())
    studio = faked(tmp_path, input_dir, fake, max_queue=0)
    picture = data_uri(png_bytes(96, 64))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: studio.make(Generate(prompt="holds the model", width=64, height=64)))
            await anyio.to_thread.run_sync(fake.entered.wait, 10)
            with pytest.raises(EngineBusyError):
                await studio.make(Edit(prompt="refused as busy", image=picture))
            fake.gate.set()  # type: ignore[union-attr]
        assert studio.store.stats().count == 1  # the first call's picture, no imported input
        fake.fail_with = RuntimeError("the model broke")
        with pytest.raises(GenerationFailedError, match="the model broke"):
            await studio.make(Edit(prompt="fails at step 2", image=picture))
        assert studio.store.stats().count == 1
    finally:
        studio.engine.close()
        studio.store.close()


async def test_cancelled_while_the_model_runs_stores_nothing(tmp_path: Path, input_dir: Path) -> None:
    fake = FakeGenerator(gate=threading.Event(), gate_at_step=2)
    studio = faked(tmp_path, input_dir, fake)
    try:
        with anyio.move_on_after(10) as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_at_step_two() -> None:
                    await anyio.to_thread.run_sync(fake.entered.wait, 10)
                    tg.cancel_scope.cancel()
                    fake.gate.set()  # type: ignore[union-attr]

                tg.start_soon(cancel_at_step_two)
                await studio.make(
                    Edit(prompt="cancelled", image=data_uri(png_bytes(96, 64)), width=64, height=64)
                )
        assert not scope.cancelled_caught
        assert studio.store.stats().count == 0
    finally:
        studio.engine.close()
        studio.store.close()


async def test_a_batch_being_stored_is_stored_whole_when_its_caller_is_cancelled(
    tmp_path: Path, input_dir: Path
) -> None:
    fake = FakeGenerator()
    studio = faked(tmp_path, input_dir, fake)
    real_put = studio.store.put
    storing = threading.Event()

    def slow_put(*args: Any, **kwargs: Any) -> Any:
        storing.set()
        time.sleep(0.2)
        return real_put(*args, **kwargs)

    studio.store.put = slow_put  # type: ignore[method-assign]
    try:
        async with anyio.create_task_group() as tg:

            async def cancel_while_storing() -> None:
                await anyio.to_thread.run_sync(storing.wait, 10)
                tg.cancel_scope.cancel()

            tg.start_soon(cancel_while_storing)
            await studio.make(Generate(prompt="three", width=64, height=64, num_images=3))
        assert studio.store.stats().count == 3
    finally:
        studio.engine.close()
        studio.store.close()


@pytest.mark.slow
async def test_calls_run_in_arrival_order_however_long_their_inputs_take_to_decode(
    tmp_path: Path, input_dir: Path
) -> None:
    fake = FakeGenerator()
    studio = faked(tmp_path, input_dir, fake, max_queue=64)
    big, small = data_uri(png_bytes(1536, 1024)), data_uri(png_bytes(96, 64))
    try:
        async with anyio.create_task_group() as tg:
            for k in range(40):
                picture = big if k % 3 == 0 else small  # every third call decodes a larger input
                tg.start_soon(
                    lambda k=k, p=picture: studio.make(Edit(prompt=f"call {k}", image=p, width=64, height=64))
                )
                await anyio.sleep(0.002)
        assert [r.prompt for r in fake.calls] == [f"call {k}" for k in range(40)]
    finally:
        studio.engine.close()
        studio.store.close()


async def test_a_busy_call_is_refused_before_its_inputs_are_decoded(
    tmp_path: Path, input_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from klein_agent.service.inputs import decoding

    fake = FakeGenerator(gate=threading.Event())
    studio = faked(tmp_path, input_dir, fake, max_queue=0)
    decoded: list[int] = []
    real = decoding.decode

    def counting(data: bytes, **kwargs: Any) -> Any:
        decoded.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(decoding, "decode", counting)
    monkeypatch.setattr("klein_agent.service.inputs.data_uri.decode", counting)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: studio.make(Generate(prompt="holds the model", width=64, height=64)))
            await anyio.to_thread.run_sync(fake.entered.wait, 10)
            with pytest.raises(EngineBusyError):
                await studio.make(Compose(prompt="refused", images=[data_uri(png_bytes(96, 64))] * 4))
            fake.gate.set()  # type: ignore[union-attr]
        assert decoded == [], "the busy call decoded nothing"
    finally:
        studio.engine.close()
        studio.store.close()


async def test_a_call_whose_storing_fails_on_a_full_disk_imports_nothing(
    tmp_path: Path, input_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import klein_agent.service.files as store_module  # the store's blob writes fsync here
    from klein_agent.service.store import StoreWriteError

    studio = faked(tmp_path, input_dir, FakeGenerator())
    photo = input_dir / "photo.png"
    photo.write_bytes(png_bytes(96, 64))

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        monkeypatch.setattr(store_module.os, "fsync", disk_full)
        with pytest.raises(StoreWriteError, match="The store is unchanged"):
            await studio.make(Edit(prompt="on a full disk", image=str(photo)))
        monkeypatch.undo()
        assert studio.store.stats().count == 0  # neither the result nor the imported input
        assert [p for p in (studio.store.root / "images").rglob("*") if p.is_file()] == []
        assert sorted(p.name for p in input_dir.iterdir()) == ["photo.png"]
    finally:
        studio.engine.close()
        studio.store.close()


async def test_a_call_whose_pictures_cannot_be_leased_stores_none_of_them(
    tmp_path: Path, input_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pictures' lease is taken beside the PNG encode (service/making.py): when it fails, nothing is stored, the
    caller gets the store's error, and the next call works."""
    from klein_agent.service.store import StoreWriteError

    studio = faked(tmp_path, input_dir, FakeGenerator())
    real = studio.store.take_leases

    def refused(holder: str, image_ids: Any, *, require_stored: bool = True) -> None:
        if not require_stored:  # the new pictures' lease, not an input's
            raise StoreWriteError("the catalog refused the lease")
        real(holder, image_ids, require_stored=require_stored)

    try:
        monkeypatch.setattr(studio.store, "take_leases", refused)
        with pytest.raises(StoreWriteError, match="refused the lease"):
            await studio.make(Generate(prompt="never stored", width=64, height=64, num_images=3))
        assert studio.store.stats().count == 0
        monkeypatch.undo()
        made = await studio.make(Generate(prompt="stored", width=64, height=64, num_images=3))
        assert len(made.images) == 3 and studio.store.stats().count == 3
    finally:
        studio.engine.close()
        studio.store.close()
