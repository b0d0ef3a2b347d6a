"""`S3BlobStore.put` against a server that fails on cue (tests/fake_s3.py, a real HTTP server on 127.0.0.1 spoken
to by the real obstore client): a transient failure is retried within the put's deadline, a retry answered 412
is success only when the object there is this put's own bytes, and a failure that stays says which it was.

The flaky shared-store test (issue 20 point 6) was a PUT that failed once under load; these make each way a PUT can
fail happen every time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from klein_agent.rules import limits
from klein_agent.service.store.records import StoreWriteError
from klein_agent.service.store.s3_blobs import S3BlobStore
from tests.fake_s3 import BUCKET, FakeS3, fake_s3

DATA = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
KEY = "ab" * 32 + ".png"
ENV = {"AWS_ACCESS_KEY_ID": "fake-key", "AWS_SECRET_ACCESS_KEY": "fake-secret-0123456789"}


@pytest.fixture
def server() -> Iterator[FakeS3]:
    with fake_s3() as state:
        yield state


def open_store(server: FakeS3) -> S3BlobStore:
    return S3BlobStore(f"s3://{BUCKET}", endpoint=server.endpoint, environ=ENV)


def test_a_put_whose_answer_was_lost_after_it_landed_succeeds(server: FakeS3) -> None:
    # the write lands, the answer is a 503; the client's retry is answered 412 by the object it wrote itself
    server.faults = ["store-then-503"]
    open_store(server).put(KEY, DATA)
    assert server.puts == ["store-then-503", "412"]
    assert server.objects == {KEY: DATA}


def test_a_put_answered_after_the_request_timeout_is_retried_and_succeeds(
    server: FakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    # obstore never retries a create-only PUT that timed out (it cannot know whether it landed): the store must
    monkeypatch.setattr(limits, "S3_REQUEST_TIMEOUT_S", 1.0)
    server.late_s = 3 * limits.S3_REQUEST_TIMEOUT_S
    server.faults = ["store-then-late"]
    open_store(server).put(KEY, DATA)
    assert server.puts[0] == "store-then-late" and server.puts[-1] == "412"
    assert server.objects == {KEY: DATA}


def test_a_server_busy_for_longer_than_the_client_retries_is_waited_out(server: FakeS3) -> None:
    # obstore retries a 503 S3_MAX_RETRIES times; a server that sheds load for longer still gets the blob
    server.faults = ["503"] * (3 * (limits.S3_MAX_RETRIES + 1))
    open_store(server).put(KEY, DATA)
    assert server.puts[-1] == "201" and server.puts.count("503") == 3 * (limits.S3_MAX_RETRIES + 1)
    assert server.objects == {KEY: DATA}


def test_a_412_over_other_bytes_is_refused_and_leaves_them(server: FakeS3) -> None:
    other = b"someone else's blob"
    server.objects[KEY] = other
    with pytest.raises(StoreWriteError, match=f"an object named {KEY} is there already with other bytes"):
        open_store(server).put(KEY, DATA)
    assert server.objects == {KEY: other} and server.puts == ["412"]


def test_refused_keys_fail_at_once_saying_so(server: FakeS3) -> None:
    server.faults = ["403"]
    began = time.monotonic()
    with pytest.raises(StoreWriteError) as caught:
        open_store(server).put(KEY, DATA)
    message = str(caught.value)
    assert "the server refused these keys (HTTP 403)" in message and "AWS_ACCESS_KEY_ID" in message, message
    assert server.puts == ["403"] and server.objects == {}
    assert time.monotonic() - began < limits.S3_PUT_DEADLINE_S  # not retried until the deadline
    assert ENV["AWS_SECRET_ACCESS_KEY"] not in message


def test_a_server_that_stays_busy_fails_within_the_deadline_saying_it_was_the_server(
    server: FakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "S3_PUT_DEADLINE_S", 2.0)
    server.faults = ["503"] * 10_000
    store = open_store(server)
    began = time.monotonic()
    with pytest.raises(StoreWriteError) as caught:
        store.put(KEY, DATA)
    took = time.monotonic() - began
    message = str(caught.value)
    assert "the server answered with an error of its own (HTTP 503)" in message and " tries in " in message
    assert "not overloaded" in message and server.objects == {}
    # no try starts after the deadline; the last one is retried by obstore within S3_RETRY_TIMEOUT_S at most
    assert took < limits.S3_PUT_DEADLINE_S + limits.S3_RETRY_TIMEOUT_S + limits.S3_REQUEST_TIMEOUT_S, took


def test_an_endpoint_gone_away_fails_within_the_deadline_saying_no_connection(
    server: FakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(server)  # checked while the server was there
    server.stop()
    monkeypatch.setattr(limits, "S3_PUT_DEADLINE_S", 2.0)
    began = time.monotonic()
    with pytest.raises(StoreWriteError) as caught:
        store.put(KEY, DATA)
    took = time.monotonic() - began
    message = str(caught.value)
    assert "no connection could be made to the endpoint" in message and "--s3-endpoint" in message, message
    assert " tries in " in message  # it was retried, as an S3 server restarting would need
    assert took < limits.S3_PUT_DEADLINE_S + limits.S3_RETRY_TIMEOUT_S + limits.S3_CONNECT_TIMEOUT_S, took
