"""What only the shared store (PostgreSQL + S3) promises beyond the interface tests: the live feed through
LISTEN/NOTIFY, eviction under concurrent writers from two front-ends, `klein-agent store copy` both ways, and no
credential in any message or log line.

These run with real servers inside the loopback-only namespace: tests/test_store_scaleout.py starts this file in a
child pytest (with the servers' coordinates in its environment); run directly, outside it, the module is skipped
with the reason (the outer test is the one that skips or, under CI, fails when containment is impossible).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from klein_agent.rules import limits
from klein_agent.service.store import ImageStore, StoredImage, StoreError, UnknownImageError
from klein_agent.service.store.copy import TIME_TOLERANCE_S
from tests import store_servers
from tests.store_backends import postgres_s3, shared_names, sqlite_folder
from tests.store_writer import tiny_png

pytestmark = pytest.mark.skipif(
    not store_servers.in_private_network(),
    reason="needs the contained PostgreSQL + S3 servers: tests/test_store_scaleout.py runs this file with them",
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Callable[..., ImageStore]]:
    """Opens front-ends (ImageStores) on one fresh shared store; closes them after the test."""
    opened: list[ImageStore] = []

    def make(**options: object) -> ImageStore:
        opened.append(postgres_s3(tmp_path / "shared", **options))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def put(store: ImageStore, seed: int, **kwargs: object) -> StoredImage:
    return store.put(tiny_png(16, random.Random(seed)), width=16, height=16, recipe={"seed": seed}, **kwargs)


# ---- the live feed -----------------------------------------------------------------------------------------------


def test_the_feed_hears_a_row_committed_by_another_front_end_within_a_second(
    shared: Callable[..., ImageStore],
) -> None:
    gallery_side, writer = shared(), shared()
    feed = gallery_side.catalog.listen()
    assert feed is not None
    try:
        made = put(writer, 1)
        start = time.monotonic()
        heard = feed.wait(1.0)
        assert heard == [made.image_id] and time.monotonic() - start < 1.0
        with pytest.raises(ValueError, match="stored already"):  # refused: nothing committed, nothing heard
            put(writer, 2, image_id=made.image_id)
        assert feed.wait(0.3) == []
        several = [put(writer, seed).image_id for seed in range(3, 6)]
        got: list[str] = []
        deadline = time.monotonic() + 2.0
        while len(got) < 3 and time.monotonic() < deadline:
            got += feed.wait(0.5)
        assert got == several, "each committed row once, in commit order"
    finally:
        feed.close()


def test_the_feed_hears_a_verdict_and_a_reader_of_marks_misses_none_committed_late(
    shared: Callable[..., ImageStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    from klein_agent.service.store import pg_catalog

    gallery_side, slow, fast = shared(), shared(), shared()
    a, b = put(slow, 1), put(fast, 2)
    feed = gallery_side.catalog.listen()
    assert feed is not None
    try:
        fast.record_verdict(b.image_id, "note", "pushed")
        start = time.monotonic()
        assert feed.wait(1.0) == [b.image_id] and time.monotonic() - start < 1.0, "a verdict wakes the feed"
    finally:
        feed.close()
    # One front-end stalls between writing its verdict and committing it (here, in its trim); another records a
    # verdict meanwhile. A reader following marks must still meet the stalled record once it commits.
    stalled, release = threading.Event(), threading.Event()
    trim = pg_catalog._trim_verdicts

    def slow_trim(cur: object, image_id: str, keep: int) -> None:
        if image_id == a.image_id:
            stalled.set()
            release.wait(10)
        trim(cur, image_id, keep)  # type: ignore[arg-type]

    monkeypatch.setattr(pg_catalog, "_trim_verdicts", slow_trim)
    mark = gallery_side.verdict_mark()
    writers = [
        threading.Thread(target=slow.record_verdict, args=(a.image_id, "pick", "slow")),
        threading.Thread(target=fast.record_verdict, args=(b.image_id, "pick", "fast")),
    ]
    writers[0].start()
    assert stalled.wait(10)
    writers[1].start()
    seen: set[str] = set()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # what a gallery reads while the slow one stalls
        ids, _, mark = gallery_side.verdict_changes(mark, limit=10)
        seen |= set(ids)
        time.sleep(0.05)
    release.set()
    for writer in writers:
        writer.join(10)
    ids, _, mark = gallery_side.verdict_changes(mark, limit=10)
    seen |= set(ids)
    assert seen == {a.image_id, b.image_id}, "a verdict committed after a later mark was read is lost"
    assert mark == gallery_side.verdict_mark()


def test_the_embedded_catalog_has_no_feed_and_the_caller_polls(tmp_path: Path) -> None:
    with sqlite_folder(tmp_path / "embedded") as store:
        assert store.catalog.listen() is None


# ---- many writers ----------------------------------------------------------------------------------------------


def test_two_front_ends_writing_at_once_keep_the_quota_and_the_leased_image(
    shared: Callable[..., ImageStore],
) -> None:
    first, second = shared(max_images=5), shared(max_images=5)
    leased = put(first, 0)
    errors: list[BaseException] = []

    def write(store: ImageStore, seeds: range) -> None:
        try:
            for seed in seeds:
                put(store, seed)
        except BaseException as e:  # reported below with the test's failure
            errors.append(e)

    with first.pinned([leased.image_id]):
        threads = [
            threading.Thread(target=write, args=(first, range(1, 21))),
            threading.Thread(target=write, args=(second, range(21, 41))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert second.exists(leased.image_id), "eviction removed the image another front-end leased"
    assert first.stats().count == 5, "concurrent inserts over- or under-evicted"
    rows = {i.image_id for i in first.list_images(limit=100)[0]}
    blobs = set(first.blobs.inventory())
    assert blobs == {i.blob_key for i in first.list_images(limit=100)[0]}, "an evicted image's blob is left"
    assert len(rows) == 5


def test_verdicts_racing_eviction_on_another_front_end_are_kept_or_refused_as_unknown_never_orphaned(
    shared: Callable[..., ImageStore],
) -> None:
    judge, writer = shared(max_images=3), shared(max_images=3)
    made = [put(writer, seed) for seed in range(3)]
    outcomes: dict[str, str] = {}
    errors: list[BaseException] = []
    writing = threading.Event()
    writing.set()

    def record() -> None:  # judges the 4 newest while the writer evicts: the oldest of them is being evicted
        round_ = 0
        while writing.is_set() and round_ < 10_000:
            round_ += 1
            for image in list(made[-4:]):
                try:
                    judge.record_verdict(image.image_id, "note", f"round {round_}")
                    outcomes.setdefault(image.image_id, "recorded")
                except UnknownImageError:
                    outcomes[image.image_id] = "unknown"
                except BaseException as e:  # a StoreWriteError here would be the FK race surfacing
                    errors.append(e)
                    return

    thread = threading.Thread(target=record)
    thread.start()
    try:
        for seed in range(3, 40):
            made.append(put(writer, seed))
    finally:
        writing.clear()
    thread.join(timeout=60)
    assert not errors, errors
    stored = {i.image_id for i in writer.list_images(limit=100)[0]}
    every = [i.image_id for i in made]
    assert set(judge.catalog.verdicts(every, notes=100)) <= stored, "a verdict outlived its image"
    assert "unknown" in outcomes.values(), "the race was never reached: the test proves nothing"


# ---- store copy, both ways -------------------------------------------------------------------------------------


def fill_embedded(root: Path) -> list[StoredImage]:
    """An embedded store with sessions, lineage (one parent deleted since) and a live lease."""
    with sqlite_folder(root) as store:
        a = put(store, 1, session="cats")
        b = put(store, 2, session="cats", parents=[a.image_id])
        gone = put(store, 3)
        c = put(store, 4, session="dogs", parents=[b.image_id, gone.image_id])
        store.delete(gone.image_id)
        store.record_verdict(a.image_id, "pick", "the sharpest")
        store.record_verdict(a.image_id, "note", "ears cut off")
        store.record_verdict(c.image_id, "pick", "")
        store.record_verdict(c.image_id, "reject", "six legs")  # the standing one, a pick before it
        store.catalog.take_leases(
            "lease_copy-test", [b.image_id], expires_at=time.time() + 3600, require_stored=True
        )
        return [a, b, c]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]}
    return subprocess.run(
        [sys.executable, "-m", "klein_agent", "store", "copy", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def digests(store: ImageStore) -> dict[str, tuple[object, ...]]:
    """Every image's id → (fields, sha256 of its PNG), through the interfaces."""
    found: dict[str, tuple[object, ...]] = {}
    page, cursor = store.list_images(limit=100)
    while True:
        for i in page:
            sha = hashlib.sha256(store.blobs.get(i.blob_key)).hexdigest()
            found[i.image_id] = (i.width, i.height, i.size_bytes, i.session, i.parents, i.recipe, sha)
        if cursor is None:
            return found
        page, cursor = store.list_images(limit=100, cursor=cursor)


def verdicts(store: ImageStore, images: list[StoredImage]) -> dict[str, list[tuple[str, str, float]]]:
    """Every image's kept verdicts, standing first, as (verdict, reason, time)."""
    found = store.catalog.verdicts([i.image_id for i in images], notes=100)
    return {
        image_id: [(r.verdict, r.reason, r.at) for r in (shown.standing, *shown.notes) if r is not None]
        for image_id, shown in found.items()
    }


def same_verdicts(
    a: dict[str, list[tuple[str, str, float]]], b: dict[str, list[tuple[str, str, float]]]
) -> bool:
    """Equal verdicts, times within what a round trip through PostgreSQL's microseconds keeps."""
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k])
        and all(
            x[:2] == y[:2] and abs(x[2] - y[2]) <= TIME_TOLERANCE_S for x, y in zip(a[k], b[k], strict=True)
        )
        for k in a
    )


def test_store_copy_moves_an_embedded_store_into_postgresql_and_s3_and_back(tmp_path: Path) -> None:
    original = tmp_path / "embedded"
    made = fill_embedded(original)
    dsn, url = shared_names(tmp_path / "shared")
    endpoint = os.environ[store_servers.S3_ENDPOINT_ENV]
    env = {**store_servers.s3_environment(endpoint), "KLEIN_TEST_DSN": dsn}

    done = cli(str(original), "env:KLEIN_TEST_DSN", "--blobs", url, env=env)
    assert done.returncode == 0, done.stderr
    assert (
        "copied 3 images, 0 already there, 1 lease rows, 3 verdicts" in done.stdout
        and "verified: 3 ids" in done.stdout
    )

    with sqlite_folder(original) as source, postgres_s3(tmp_path / "shared") as target:
        assert digests(target) == digests(source)
        assert [i.image_id for i in target.list_images()[0]] == [i.image_id for i in made[::-1]], "order kept"
        assert [s.session for s in target.sessions()] == [s.session for s in source.sessions()]
        leases = [(r.image_id, r.holder) for r in target.catalog.lease_rows()]
        assert leases == [(made[1].image_id, "lease_copy-test")]
        want = verdicts(source, made)
        assert [v[:2] for v in want[made[2].image_id]] == [("reject", "six legs")]
        assert same_verdicts(verdicts(target, made), want)
        assert [i.image_id for i in target.list_images(standing="pick")[0]] == [made[0].image_id]

    again = cli(
        str(original), "env:KLEIN_TEST_DSN", "--blobs", url, env=env
    )  # a rerun finishes, adds nothing
    assert again.returncode == 0 and "copied 0 images, 3 already there" in again.stdout, again.stderr

    back = tmp_path / "back"
    done = cli("env:KLEIN_TEST_DSN", str(back), "--blobs", url, env=env)
    assert done.returncode == 0, done.stderr
    with sqlite_folder(original) as source, sqlite_folder(back) as copy:
        assert digests(copy) == digests(source)
        for image in made:
            assert copy.get(image.image_id).created_at == pytest.approx(image.created_at, abs=2e-6)
        assert same_verdicts(verdicts(copy, made), verdicts(source, made))

    with postgres_s3(tmp_path / "shared") as target:  # a verdict the source does not have: found, not merged
        target.record_verdict(made[2].image_id, "note", "recorded after the copy")
    differs = cli(str(original), "env:KLEIN_TEST_DSN", "--blobs", url, env=env)
    assert differs.returncode == 1, differs.stderr
    assert (
        f"{made[2].image_id}: its verdicts differ in the destination (standing reject, 1 notes there, "
        "standing reject, 0 notes here)"
    ) in differs.stderr


def test_store_copy_refuses_an_id_held_with_other_bytes(tmp_path: Path) -> None:
    original = tmp_path / "embedded"
    made = fill_embedded(original)
    dsn, url = shared_names(tmp_path / "shared")
    env = {**store_servers.s3_environment(os.environ[store_servers.S3_ENDPOINT_ENV]), "KLEIN_TEST_DSN": dsn}
    with postgres_s3(tmp_path / "shared") as target:  # the same id, other pixels: not the same image
        put(target, 99, image_id=made[0].image_id, session="cats")
    done = cli(str(original), "env:KLEIN_TEST_DSN", "--blobs", url, env=env)
    assert done.returncode == 2
    assert f"already holds {made[0].image_id} as another image" in done.stderr


# ---- credentials ---------------------------------------------------------------------------------------------


def test_no_password_or_key_reaches_an_error_or_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from klein_agent.service.store.open import open_store

    caplog.set_level(logging.DEBUG)
    admin = os.environ[store_servers.PG_ADMIN_ENV]
    endpoint = os.environ[store_servers.S3_ENDPOINT_ENV]
    env = store_servers.s3_environment(endpoint)
    messages: list[str] = []
    cases = [  # libpq quotes a malformed escape of the password back; the server named does not exist
        ("postgresql://klein:Pw%zzSecret-1@/nodb?host=/nonexistent", "Pw%zzSecret-1"),
        ("postgresql://klein:Secret-2@/nodb?host=/nonexistent", "Secret-2"),
        (
            admin.replace("postgresql://postgres@", "postgresql://postgres:Secret-3@").replace(
                "?", "?sslmode=bad&"
            ),
            "Secret-3",
        ),
    ]
    for dsn, secret in cases:
        with pytest.raises(StoreError) as info:
            open_store(dsn, "s3://klein/x", root=tmp_path / "r", s3_endpoint=endpoint, environ=env)
        messages.append(str(info.value))
        assert secret not in str(info.value) and "***" in str(info.value), str(info.value)
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "Secret-4-wrong-key"}
    dsn, url = shared_names(tmp_path / "s3-case")
    with pytest.raises(StoreError) as info:
        open_store(dsn, url, root=tmp_path / "r", s3_endpoint=endpoint, environ=wrong)
    messages.append(str(info.value))
    assert "Cannot use the blob store" in str(info.value)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("Secret-1", "Secret-2", "Secret-3", "Secret-4", store_servers.S3_SECRET):
        assert secret not in logged and all(secret not in m for m in messages), secret
    # the command line as a user runs it: the DSN from a variable, the message on stderr
    done = cli("env:BAD_DSN", str(tmp_path / "out"), "--blobs", url, env={**wrong, "BAD_DSN": cases[1][0]})
    assert done.returncode == 2 and "Secret-2" not in done.stderr + done.stdout and "***" in done.stderr


# ---- faults ----------------------------------------------------------------------------------------------------


def test_a_front_end_keeps_working_after_postgresql_restarts(shared: Callable[..., ImageStore]) -> None:
    store = shared()
    before = put(store, 1)
    store_servers.restart_postgres(Path(os.environ[store_servers.PG_DATA_ENV]))  # every connection is cut
    after = put(store, 2)  # no reopen: the pool replaces its dropped connections before using them
    assert [i.image_id for i in store.list_images()[0]] == [after.image_id, before.image_id]
    feed = store.catalog.listen()
    assert feed is not None
    feed.close()


class Proxy:
    """A TCP relay on 127.0.0.1 in front of a server, which the test can cut (S3 unreachable) and restore."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.links: list[object] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()  # unreachable: the connection is dropped at once
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.links += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: object, b: object) -> None:
        import socket

        assert isinstance(a, socket.socket) and isinstance(b, socket.socket)
        try:
            while self.open.is_set() and (data := a.recv(65536)):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> None:
        self.open.clear()
        for s in self.links:
            with contextlib.suppress(OSError):
                s.close()  # type: ignore[attr-defined]
        self.links.clear()


def test_s3_unreachable_for_a_while_fails_puts_clearly_stores_nothing_and_recovers(tmp_path: Path) -> None:
    from urllib.parse import urlsplit

    from klein_agent.service.store import StoreWriteError
    from klein_agent.service.store.open import open_store

    endpoint = os.environ[store_servers.S3_ENDPOINT_ENV]
    proxy = Proxy(urlsplit(endpoint).port or 80)
    dsn, url = shared_names(tmp_path / "shared")
    via = f"http://127.0.0.1:{proxy.port}"
    env = store_servers.s3_environment(via)
    with open_store(dsn, url, root=tmp_path / "shared", s3_endpoint=via, environ=env) as store:
        first = put(store, 1)
        proxy.cut()
        start = time.monotonic()
        with pytest.raises(
            StoreWriteError, match=r"Could not save the image in s3://klein/\S+ at http://127"
        ):
            put(store, 2)
        failed_after = time.monotonic() - start
        assert [i.image_id for i in store.list_images()[0]] == [first.image_id], "a row without its blob"
        proxy.open.set()  # S3 is back: the same store, not reopened, stores again
        second = put(store, 3)
        assert [i.image_id for i in store.list_images()[0]] == [second.image_id, first.image_id]
        assert store.read_png(first.image_id) and store.read_png(second.image_id)
    # retried until the put's deadline; the last try, started before it, is retried by obstore within its own
    bound = limits.S3_PUT_DEADLINE_S + limits.S3_RETRY_TIMEOUT_S
    assert failed_after < bound, f"a put waited {failed_after:.1f} s on an unreachable S3"
