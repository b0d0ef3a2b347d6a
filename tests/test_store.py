"""Tests of klein_agent.service.store: round trips, listing, id hygiene, path safety, crash safety (kill -9), I/O faults,
quota and eviction, pins, migrations and threads. CPU only, no torch; the whole file runs in well under a minute.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs
import pytest
from PIL import Image

from klein_agent.option_types import default_store_dir, store_locations
from klein_agent.rules.limits import LEASE_TTL_S
from klein_agent.service.store import (
    ImageStore,
    StoredImage,
    StoreError,
    StoreFullError,
    StoreWriteError,
    UnknownImageError,
    new_image_id,
)
from klein_agent.service.store import migrations as store_migrations
from klein_agent.service.store.folder_blobs import FolderBlobStore

REPO = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("store_writer.py")
CRASH_ITERATIONS = int(os.environ.get("KLEIN_AGENT_CRASH_ITERATIONS", "50"))


def make_png(size: int = 16, seed: int = 0) -> bytes:
    """Random RGB pixels: incompressible, so the byte size is predictable (about 3 * size**2)."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def put(store: ImageStore, size: int = 16, seed: int = 0, **kwargs: Any) -> StoredImage:
    recipe = kwargs.pop("recipe", {"tool": "generate", "prompt": "a cat", "seed": seed, "size": [size, size]})
    return store.put(make_png(size, seed), width=size, height=size, recipe=recipe, **kwargs)


def file_name(image_id: str) -> str:
    return hashlib.sha256(image_id.encode()).hexdigest() + ".png"


def file_of(store: ImageStore, image: StoredImage) -> Path:
    """The file of a stored image in the local (folder) blob store: these tests tamper with it."""
    assert isinstance(store.blobs, FolderBlobStore)
    return store.blobs.path_of(image.blob_key)


def on_disk_bytes(root: Path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(root / "images") if entry.is_file())


def assert_consistent(root: Path, *, verify_png: bool = True, before_sweep: bool = False) -> set[str]:
    """The store's invariants, read straight from SQLite and the directory: integrity ok, every row has its
    regular file of the recorded size; and, unless a crash has not been swept yet, no temp or orphan files.
    Returns the ids."""
    if before_sweep and not (root / "store.sqlite3").exists():
        return set()  # killed before the store was first created
    conn = sqlite3.connect(root / "store.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if before_sweep and "images" not in tables:
            return set()  # killed before the first migration committed
        rows = conn.execute("SELECT image_id, size_bytes FROM images").fetchall()
    finally:
        conn.close()
    names = set(os.listdir(root / "images"))
    if not before_sweep:
        assert not [n for n in names if n.startswith(".tmp-")], "temp files left behind"
    for image_id, size_bytes in rows:
        path = root / "images" / file_name(image_id)
        assert path.is_file() and not path.is_symlink(), f"row {image_id} has no file"
        assert path.stat().st_size == size_bytes
        if verify_png:
            with Image.open(path) as im:
                im.verify()
    if not before_sweep:
        assert names == {file_name(i) for i, _ in rows}, "orphan files"
    return {i for i, _ in rows}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[ImageStore]:
    with ImageStore(root) as s:
        yield s


# ---- round trips and validation -----------------------------------------------------------------------------


def test_put_get_read_round_trip(store: ImageStore, root: Path) -> None:
    png = make_png(16, 1)
    recipe = {
        "tool": "generate",
        "prompt": "a red fox",
        "seed": 7,
        "size": [16, 16],
        "timings": {"total": 1.5},
    }
    a = store.put(png, width=16, height=16, recipe=recipe, session="s1")
    assert ImageStore.is_valid_id(a.image_id)
    assert (a.width, a.height, a.size_bytes, a.session, a.parents) == (16, 16, len(png), "s1", ())
    assert a.recipe == recipe and file_of(store, a) == root.resolve() / "images" / file_name(a.image_id)
    assert abs(a.created_at - time.time()) < 60
    assert store.get(a.image_id) == a
    assert store.read_png(a.image_id) == png
    assert store.exists(a.image_id) and not store.exists(new_image_id())
    b = put(store, seed=2, parents=[a.image_id, a.image_id])
    assert store.get(b.image_id).parents == (a.image_id, a.image_id)
    assert store.stats().count == 2 and store.stats().total_bytes == a.size_bytes + b.size_bytes
    assert_consistent(root)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"png": b"not a png at all, definitely not" * 2}, ValueError),
        ({"width": 32}, ValueError),
        ({"height": 0}, ValueError),
        ({"width": True}, ValueError),
        ({"png": "text"}, TypeError),
        ({"session": ""}, ValueError),
        ({"session": "x" * 65}, ValueError),
        ({"session": "../etc"}, ValueError),
        ({"session": "ok\n"}, ValueError),
        ({"recipe": {"x": {1, 2}}}, ValueError),
        ({"recipe": {"x": float("nan")}}, ValueError),
        ({"recipe": {"x": object()}}, ValueError),
        ({"recipe": ["not", "a", "dict"]}, ValueError),
        ({"recipe": {"x": "y" * 300_000}}, ValueError),
        ({"parents": "img_aaaaaaaaaaaaaaaaaaaaaa"}, TypeError),
        ({"parents": ["../x"]}, UnknownImageError),
    ],
)
def test_put_rejects_bad_arguments(
    store: ImageStore, root: Path, kwargs: dict[str, Any], error: type
) -> None:
    args: dict[str, Any] = {"png": make_png(16), "width": 16, "height": 16, "recipe": {"tool": "generate"}}
    args.update(kwargs)
    png = args.pop("png")
    with pytest.raises(error):
        store.put(png, **args)
    assert store.stats().count == 0
    assert os.listdir(root / "images") == []


def test_list_newest_first_pages_and_sessions(store: ImageStore) -> None:
    ids = [put(store, seed=i, session="a" if i % 2 else "b").image_id for i in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = store.list_images(limit=3, cursor=cursor)
        seen += [im.image_id for im in page]
        pages += 1
        if cursor is None:
            break
    assert seen == ids[::-1] and pages == 3
    a_page, a_cursor = store.list_images(session="a", limit=2)
    assert [im.image_id for im in a_page] == [ids[5], ids[3]] and a_cursor is not None
    rest, end = store.list_images(session="a", limit=2, cursor=a_cursor)
    assert [im.image_id for im in rest] == [ids[1]] and end is None
    assert store.list_images(session="nobody") == ([], None)
    full, none = store.list_images(limit=7)
    assert len(full) == 7 and none is None  # an exact fit has no next page
    with pytest.raises(ValueError, match="same session"):
        store.list_images(session="b", cursor=a_cursor)
    forged = base64.urlsafe_b64encode(json.dumps({"v": 1, "before": "1", "session": None}).encode()).decode()
    for bad in ["", "garbage!", "x" * 300, "AAAA", forged.rstrip("="), "eyJ2IjoxfQ", "../../etc"]:
        with pytest.raises(ValueError, match="next_cursor"):
            store.list_images(cursor=bad)
    for bad_limit in (0, -1, 1001, True):
        with pytest.raises(ValueError):
            store.list_images(limit=bad_limit)
    with pytest.raises(ValueError):
        store.list_images(session="bad/session")


# ---- ids and path safety ----------------------------------------------------------------------------------


def test_ids_are_unique_random_and_128_bits(store: ImageStore) -> None:
    ids = [new_image_id() for _ in range(10_000)]
    assert len(set(ids)) == 10_000
    assert all(ImageStore.is_valid_id(i) for i in ids)
    raw = [base64.urlsafe_b64decode(i[4:] + "==") for i in ids]
    assert {len(r) for r in raw} == {16}  # 128 random bits each
    # Not sequential or time-based: every one of the 128 bit positions is set about half the time.
    for bit in range(128):
        ones = sum((int.from_bytes(r, "big") >> bit) & 1 for r in raw[:2000])
        assert 850 < ones < 1150, f"bit {bit} is biased: {ones}/2000"
    assert ImageStore.is_valid_id(put(store).image_id)


VALID_LOOKING = "img_" + "A" * 22
HOSTILE_IDS: list[Any] = [
    "",
    " ",
    "img_",
    "../x",
    "..\\x",
    "/etc/passwd",
    "C:\\x",
    "C:/Windows/win.ini",
    "\\\\server\\share\\x",
    "%2e%2e/",
    "%2e%2e%2fetc%2fpasswd",
    "..%2f..%2fetc",
    "x\x00y",
    VALID_LOOKING[:-1] + "\x00",
    "img_" + "A" * 21,
    "img_" + "A" * 23,
    "img_" + "A" * 10_000,
    "A" * 100_000,
    "IMG_" + "A" * 22,
    "img-" + "A" * 22,
    " img_" + "A" * 22,
    VALID_LOOKING + " ",
    VALID_LOOKING + "\n",
    VALID_LOOKING + "\r\n",
    "img_" + "A" * 21 + "=",
    "img_" + "A" * 21 + "/",
    "img_" + "A" * 21 + ".",
    "img_../../../../etc/pass",
    "img_" + "А" * 22,  # Cyrillic A
    "img_" + "Ａ" * 22,  # fullwidth A
    "img_" + "A" * 21 + "\u200b",  # zero-width space
    "img_" + "A" * 21 + "١",  # Arabic-Indic digit one
    "іmg_" + "A" * 22,  # Ukrainian i
    "file:///etc/passwd",
    "image://" + VALID_LOOKING,
    "klein://image/" + VALID_LOOKING,
    "~/.ssh/id_rsa",
    "images/" + VALID_LOOKING,
    "' OR '1'='1",
    "img_'); DROP TABLE images;--",
    "store_evil/../" + VALID_LOOKING,
    VALID_LOOKING,  # well formed but absent
    "img_" + "_" * 22,  # well formed but absent
    "img_" + "-" * 22,  # well formed but absent
    None,
    12345,
    b"img_AAAAAAAAAAAAAAAAAAAAAA",
]

_OPEN_EVENTS: list[tuple[str, tuple[Any, ...]]] = []
_RECORDING = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _RECORDING.is_set() and event in {
        "open",
        "os.listdir",
        "os.scandir",
        "os.remove",
        "os.rename",
        "shutil.copyfile",
    }:
        _OPEN_EVENTS.append((event, args))


sys.addaudithook(_audit)  # a hook cannot be removed; it records only while _RECORDING is set


def test_hostile_ids_are_unknown_with_one_message(store: ImageStore, root: Path) -> None:
    assert len(HOSTILE_IDS) >= 40
    real = put(store)
    well_formed = [b for b in HOSTILE_IDS if ImageStore.is_valid_id(b)]
    assert well_formed == [VALID_LOOKING, "img_" + "_" * 22, "img_" + "-" * 22]
    head, tail = "Unknown image id ", ". Call list_images to see the ids in the store."
    _OPEN_EVENTS.clear()
    _RECORDING.set()
    try:
        for bad in HOSTILE_IDS:
            assert store.exists(bad) is False
            for call in (store.get, store.read_png):
                with pytest.raises(UnknownImageError) as info:
                    call(bad)
                message = str(info.value)
                # Malformed and absent ids get the same message: no existence oracle.
                assert message == str(UnknownImageError(bad))
                assert message.startswith(head) and message.endswith(tail) and len(message) < 150
                assert isinstance(info.value, LookupError)
            with pytest.raises(UnknownImageError), store.pinned([real.image_id, bad]):
                pass
    finally:
        _RECORDING.clear()
    assert _OPEN_EVENTS == [], "hostile ids reached the filesystem"
    assert str(UnknownImageError("img_x")) == head + "'img_x'" + tail
    assert store.read_png(real.image_id)  # the real image is untouched and was never pinned for good


def test_symlinks_in_images_do_not_escape(store: ImageStore, root: Path, tmp_path: Path) -> None:
    secret_dir = tmp_path / "outside"
    secret_dir.mkdir()
    victim = put(store, seed=1)
    keeper = put(store, seed=2)
    secret = secret_dir / "secret.png"
    secret_bytes = b"S" * victim.size_bytes  # the same size: only O_NOFOLLOW, not the size check, stops it
    secret.write_bytes(secret_bytes)
    file_of(store, victim).unlink()
    file_of(store, victim).symlink_to(
        secret
    )  # an attacker swaps an image file for a link to a file outside the store
    (root / "images" / "evil.png").symlink_to(secret)
    (root / "images" / "etc").symlink_to(secret_dir, target_is_directory=True)
    with pytest.raises(UnknownImageError):
        store.read_png(victim.image_id)
    with pytest.raises(UnknownImageError):
        store.get(victim.image_id)
    for name in ("evil", "etc", "evil.png", "../outside/secret.png"):
        with pytest.raises(UnknownImageError):
            store.read_png(name)
    store.close()
    with ImageStore(root) as reopened:  # the sweep unlinks the links, never their targets
        assert not reopened.exists(victim.image_id)
        assert reopened.read_png(keeper.image_id) == make_png(16, 2)
    assert secret.read_bytes() == secret_bytes and secret_dir.is_dir()
    assert sorted(os.listdir(root / "images")) == [file_name(keeper.image_id)]


# ---- persistence and sweeping -----------------------------------------------------------------------------


def test_restart_keeps_everything(root: Path) -> None:
    with ImageStore(root) as s:
        a = put(s, seed=1, session="run")
        b = put(s, seed=2, parents=[a.image_id], session="run")
        c = put(s, seed=3, parents=[a.image_id, b.image_id])
        before = s.list_images(limit=10)
    with ImageStore(root) as s:
        assert s.list_images(limit=10) == before
        for im, seed in ((a, 1), (b, 2), (c, 3)):
            assert s.get(im.image_id) == im
            assert s.read_png(im.image_id) == make_png(16, seed)
    assert_consistent(root)


def test_sweep_removes_orphans_temp_files_and_dangling_rows(root: Path) -> None:
    with ImageStore(root) as s:
        keep = put(s, seed=1)
        lost = put(s, seed=2)
        damaged = put(s, seed=3)
    images = root / "images"
    (images / "stray.png").write_bytes(make_png(8))
    (images / file_name(new_image_id())).write_bytes(make_png(8))  # a crash between rename and commit
    (images / ".tmp-0123456789abcdef").write_bytes(b"half a png")
    file_of(s, lost).unlink()
    file_of(s, damaged).write_bytes(
        file_of(s, damaged).read_bytes()[:-10]
    )  # truncated behind the store's back
    with ImageStore(root) as s:
        assert s.exists(keep.image_id)
        assert not s.exists(lost.image_id) and not s.exists(damaged.image_id)
        assert s.stats().count == 1
    assert os.listdir(images) == [file_name(keep.image_id)]
    assert_consistent(root)


def test_second_opener_leaves_fresh_files_alone(root: Path) -> None:
    """Another process may be between its rename and its commit: only the sole opener sweeps fresh files."""
    first = ImageStore(root)
    try:
        in_flight = root / "images" / ".tmp-feedfacefeedface"
        in_flight.write_bytes(b"being written by someone else")
        with ImageStore(root) as second:
            assert in_flight.exists()
            assert put(second).image_id
    finally:
        first.close()
    ImageStore(root).close()
    assert not in_flight.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize(
    ("iterations", "max_images"), [(CRASH_ITERATIONS, 100_000), (max(CRASH_ITERATIONS // 3, 10), 6)]
)
@pytest.mark.slow
def test_kill_9_loses_nothing_acknowledged(root: Path, iterations: int, max_images: int) -> None:
    """A child puts in a loop and is SIGKILLed after 0-200 ms; every acknowledged id must survive, the database
    must pass integrity_check, no row may lack its file even before the sweep, and the sweep must leave no
    temp files. With max_images=6 evictions run (and crash) too; then the newest acknowledged ids must survive."""
    rng = random.Random(1234 + max_images)
    acknowledged: list[str] = []
    for iteration in range(iterations):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(root), str(max_images), str(iteration)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        head = b""
        if iteration % 4:  # mostly time the kill from "ready"; every 4th from spawn, to hit open and sweep
            head = proc.stdout.readline() if proc.stdout else b""
            assert head == b"ready\n", proc.communicate()[1].decode()
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        lines = (head + out).split(b"\n")[:-1]  # a line without its newline was not acknowledged
        new = [line.decode() for line in lines if line != b"ready"]
        acknowledged += new

        # Before any sweep: the database is sound and no row lacks its file.
        present = assert_consistent(root, verify_png=False, before_sweep=True)
        # The killed writer's lease on its last parent would protect that image for LEASE_TTL_S (its inputs
        # are held as if the call still ran: tests/test_store_leases.py); here the clock is past its expiry, so
        # the open purges it and the bound alone decides what survives, run after run.
        with ImageStore(root, max_images=max_images, clock=lambda: time.time() + LEASE_TTL_S + 1) as s:
            if max_images >= len(acknowledged) + iterations:
                must_survive = acknowledged
            else:  # at most one unacknowledged put per run follows the last acknowledged one
                must_survive = new[-(max_images - 1) :]
            missing = [i for i in must_survive if not s.exists(i)]
            assert not missing, f"iteration {iteration}: lost acknowledged ids {missing}"
            for image_id in new:
                if image_id in present:
                    with Image.open(io.BytesIO(s.read_png(image_id))) as im:
                        im.verify()
        assert_consistent(root, verify_png=False)
    assert len(acknowledged) > iterations, "the writer barely ran; the test proves little"
    assert_consistent(root, verify_png=True)


# ---- I/O faults -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["open", "write", "fsync", "close", "replace"])
def test_os_faults_during_put_leave_the_store_consistent(
    root: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make the k-th call of one os function inside put() fail with ENOSPC, for every k that put() reaches."""
    real = getattr(os, name)
    with ImageStore(root) as s:
        base = put(s, seed=0)
        failures = 0
        for k in range(1, 10):
            calls = 0

            def faulty(*args: Any, k: int = k, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == k:
                    if name == "close":
                        real(*args, **kwargs)  # close errors (NFS) come after the fd is gone
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(*args, **kwargs)

            with monkeypatch.context() as m:
                m.setattr(os, name, faulty)
                try:
                    put(s, seed=k, parents=[base.image_id])
                except StoreWriteError as e:
                    failures += 1
                    assert "No space left on device" in str(e) and "Free disk space" in str(e)
                    assert isinstance(e.__cause__, OSError)
                else:
                    assert calls < k, "the fault was injected but put() succeeded"
                    break
            assert_consistent(root)
        assert failures >= 1
        assert put(s, seed=99).image_id  # the next put works


@pytest.mark.parametrize("statement", ["BEGIN", "INSERT", "DELETE", "COMMIT"])
@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), sqlite3.OperationalError("database or disk is full")],
)
def test_database_faults_during_put_leave_the_store_consistent(
    root: Path, statement: str, error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ImageStore(root, max_images=2) as s:
        first, second = (
            put(s, seed=1),
            put(s, seed=2),
        )  # full: the next put evicts (DELETE) in its transaction
        real = s.catalog._execute  # type: ignore[attr-defined]

        def faulty(sql: str, params: Any = ()) -> sqlite3.Cursor:
            if sql.lstrip().upper().startswith(statement):
                raise error
            return real(sql, params)

        monkeypatch.setattr(s.catalog, "_execute", faulty)
        with pytest.raises(StoreWriteError, match="Free disk space"):
            put(s, seed=3)
        monkeypatch.undo()
        assert {im.image_id for im in s.list_images()[0]} == {first.image_id, second.image_id}
        assert_consistent(root)
        third = put(s, seed=4)
        assert s.exists(third.image_id) and s.stats().count == 2
    assert_consistent(root)


def test_get_survives_a_failing_lru_write(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    image = put(store)
    real = store.catalog._execute  # type: ignore[attr-defined]

    def faulty(sql: str, params: Any = ()) -> sqlite3.Cursor:
        if sql.startswith("UPDATE"):
            raise sqlite3.OperationalError("database or disk is full")
        return real(sql, params)

    monkeypatch.setattr(store.catalog, "_execute", faulty)
    assert store.read_png(image.image_id) == make_png()
    assert store.get(image.image_id) == image


# ---- quota, eviction, pins ----------------------------------------------------------------------------------


def test_byte_quota_lru_and_pins(root: Path) -> None:
    size = len(make_png(24, 0))
    quota = 10 * size + size // 2
    with ImageStore(root, max_bytes=quota) as s:
        pinned = put(s, size=24, seed=0)
        written = [put(s, size=24, seed=i) for i in range(1, 4)]
        s.get(written[0].image_id)  # used: now newer than written[1] and written[2]
        order: list[str] = []
        total_written = 0
        with s.pinned([pinned.image_id]):
            seed = 100
            while total_written < 3 * quota:
                im = put(s, size=24, seed=seed)
                seed += 1
                total_written += im.size_bytes
                written.append(im)
                assert on_disk_bytes(root) <= quota and s.stats().total_bytes <= quota
                assert s.exists(pinned.image_id)
                order += [w.image_id for w in written if w.image_id not in order and not s.exists(w.image_id)]
        assert s.read_png(pinned.image_id) == make_png(24, 0)
        expected = [written[1].image_id, written[2].image_id, written[0].image_id]
        assert order[:3] == expected, "eviction did not follow least-recent use"
        assert order[3:] == [w.image_id for w in written[3:] if w.image_id in order]  # then creation order
        assert len(order) > 10
    assert_consistent(root)


def test_count_bound_and_lru_order(root: Path) -> None:
    with ImageStore(root, max_images=3) as s:
        a, b, c = (put(s, seed=i) for i in range(3))
        s.get(a.image_id)
        d = put(s, seed=3)
        assert not s.exists(b.image_id) and s.exists(a.image_id)
        s.read_png(c.image_id)
        put(s, seed=4)
        assert not s.exists(a.image_id) and s.exists(c.image_id) and s.exists(d.image_id)
        more = [put(s, seed=10 + i) for i in range(9)]
        assert s.stats().count == 3
        assert [im.image_id for im in s.list_images()[0]] == [m.image_id for m in more[::-1][:3]]
    assert_consistent(root)


def test_too_large_and_pinned_full_raise_store_full(root: Path) -> None:
    small = len(make_png(16))
    with ImageStore(root, max_bytes=2 * small + small // 2) as s:
        with pytest.raises(StoreFullError, match="larger than the whole store quota"):
            put(s, size=64)
        assert os.listdir(root / "images") == []
        a, b = put(s, seed=1), put(s, seed=2)
        with (
            s.pinned([a.image_id, b.image_id]),
            pytest.raises(StoreFullError, match="in use by running calls"),
        ):
            put(s, seed=3)
        assert_consistent(root)
        assert s.stats().count == 2
        with s.pinned([b.image_id]):
            c = put(s, seed=3)
        assert not s.exists(a.image_id) and s.exists(b.image_id) and s.exists(c.image_id)
    assert_consistent(root)


def test_pins_are_reentrant_counted_and_checked(root: Path) -> None:
    with ImageStore(root, max_images=2) as s:
        a = put(s, seed=1)
        with s.pinned([a.image_id]):
            with s.pinned([a.image_id]):
                put(s, seed=2)
                put(s, seed=3)
            put(s, seed=4)  # still pinned by the outer block
            assert s.exists(a.image_id)
        put(s, seed=5)
        assert not s.exists(a.image_id)
        b = put(s, seed=6)
        with pytest.raises(UnknownImageError), s.pinned([b.image_id, a.image_id]):
            pass
        with pytest.raises(TypeError):
            s.pinned(b.image_id)
        put(s, seed=7)
        put(s, seed=8)
        assert not s.exists(b.image_id), "a failed pinned() must not leave a pin behind"


# ---- schema, threads, imports, locations -------------------------------------------------------------------


def test_migrations_apply_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ImageStore(root) as s:
        v1_image = put(s, seed=1)
    next_version = len(store_migrations.MIGRATIONS) + 1

    def m_probe(execute: store_migrations.Execute) -> None:
        execute("ALTER TABLE images ADD COLUMN note TEXT", ())
        execute("CREATE TABLE probe (n INTEGER)", ())
        execute("INSERT INTO probe VALUES (1)", ())

    probe = store_migrations.Migration(next_version, "probe", m_probe)
    monkeypatch.setattr(store_migrations, "MIGRATIONS", [*store_migrations.MIGRATIONS, probe])
    for _ in range(20):
        with ImageStore(root) as s:
            assert s.get(v1_image.image_id) == v1_image  # v1 data readable after the upgrade
    conn = sqlite3.connect(root / "store.sqlite3")
    try:
        versions = [(v,) for v in range(1, next_version + 1)]
        assert conn.execute("SELECT version FROM _migrations ORDER BY version").fetchall() == versions
        assert conn.execute("SELECT COUNT(*) FROM probe").fetchone() == (1,)
    finally:
        conn.close()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="newer than this klein-agent"):
        ImageStore(root)


def test_threads_put_get_pin_concurrently(root: Path) -> None:
    with ImageStore(root, max_images=40) as s:
        shared = [put(s, seed=-1).image_id]
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def worker(n: int) -> None:
            try:
                rng = random.Random(n)
                start.wait()
                parent = put(s, seed=n * 1000).image_id
                for i in range(15):
                    with s.pinned([parent]):
                        assert s.read_png(parent)
                        child = put(s, seed=n * 1000 + i + 1, parents=[parent], session=f"t{n}")
                    assert s.get(child.image_id).parents == (parent,)
                    parent = child.image_id
                    shared.append(child.image_id)
                    with contextlib.suppress(UnknownImageError):  # may be evicted by another thread
                        s.read_png(rng.choice(shared))
                    s.list_images(session=f"t{n}", limit=5)
                    assert s.stats().count <= 40
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[:3]
        assert s.stats().count == 40
    assert_consistent(root)


def test_import_does_not_import_torch() -> None:
    code = "import sys, klein_agent.service.store; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_default_store_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$KLEIN_AGENT_STORE wins; else platformdirs' user data folder (chosen for the platform this runs on)."""
    monkeypatch.setenv("KLEIN_AGENT_STORE", str(tmp_path / "mine"))
    assert default_store_dir() == tmp_path / "mine"
    monkeypatch.delenv("KLEIN_AGENT_STORE")
    assert default_store_dir() == Path(platformdirs.user_data_dir("klein-agent", appauthor=False)) / "store"
    if sys.platform.startswith("linux"):  # the XDG rules, on the platform where they apply
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert default_store_dir() == tmp_path / "xdg" / "klein-agent" / "store"
        monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
        assert default_store_dir() == tmp_path / "home" / ".local" / "share" / "klein-agent" / "store"


def test_the_token_file_and_thumbnails_stay_where_they_were(tmp_path: Path) -> None:
    """The commands compute the neighbours of a store once from --store; existing users keep their files."""
    where = store_locations(tmp_path / "s")
    assert (where.store, where.token_file, where.thumbs) == (
        tmp_path / "s",
        tmp_path / "s.http-token",
        tmp_path / "s" / "thumbs",
    )
    assert "--store" in where.source


def test_closed_store_and_bad_settings(root: Path) -> None:
    s = ImageStore(root)
    image = put(s)
    s.close()
    s.close()
    for call in (lambda: s.get(image.image_id), lambda: put(s), s.stats, lambda: s.list_images()):
        with pytest.raises(StoreError, match="closed"):
            call()
    assert os.listdir(root / "images") == [file_name(image.image_id)]
    for bad in ({"max_bytes": 0}, {"max_images": -1}, {"max_bytes": 1.5}):
        with pytest.raises(ValueError):
            ImageStore(root, **bad)
    (root / "not-a-db").mkdir()
    (root / "not-a-db" / "store.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable image store"):
        ImageStore(root / "not-a-db")
