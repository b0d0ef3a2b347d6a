"""The connection book closes the connection idle longest first, refuses a newcomer when all are busy, and its
bound leaves descriptors for the store and the model (`klein_agent.web.connections`). In-process."""

from __future__ import annotations

from klein_agent.web.connections import RESERVED_FDS_MIN, ConnectionBook, descriptor_budget


class FakeConnection:
    def __init__(self, name: str, idle: bool) -> None:
        self.name, self.idle, self.closed = name, idle, False

    def is_idle(self) -> bool:
        return self.idle

    def shed(self) -> None:
        self.closed = True


def test_at_the_bound_the_connection_idle_longest_goes_first() -> None:
    book = ConnectionBook(bound=3)
    old, busy, new = FakeConnection("old", True), FakeConnection("busy", False), FakeConnection("new", True)
    for connection in (old, busy, new):
        assert book.admit()
        book.started(connection)
    book.active(old)  # old just did something: now `new` has been idle longest
    assert book.admit() and new.closed and not old.closed and not busy.closed
    book.started(FakeConnection("fourth", False))
    book.ended(new)
    assert book.held == 3
    old.idle = False
    assert not book.admit(), "every connection busy: the newcomer is refused, nobody is closed"
    assert not old.closed and not busy.closed


def test_a_burst_of_accepts_waits_for_the_connections_to_start_instead_of_refusing() -> None:
    # asyncio's accept loop takes up to `backlog` connections per wakeup before any protocol starts: at the bound
    # the book must wait a loop turn for them to start (they are idle, not busy), not answer 503 to the rest.
    book = ConnectionBook(bound=3)
    for _ in range(3):
        assert book.may_accept() and book.admit()
    assert not book.may_accept(), "at the bound with nothing started: wait, do not refuse"
    flood = [FakeConnection(f"flood{i}", True) for i in range(3)]
    for connection in flood:
        book.started(connection)
    assert book.may_accept() and book.admit() and flood[0].closed, "once started, the idle longest goes"
    client = FakeConnection("client", False)
    book.started(client)
    assert book.may_accept() and book.admit() and flood[1].closed
    assert not client.closed


def test_a_connection_that_never_starts_stops_accepting_for_a_moment_only(monkeypatch) -> None:
    import klein_agent.web.connections as connections

    book = ConnectionBook(bound=2)
    idle = FakeConnection("idle", True)
    assert book.admit() and book.admit()
    book.started(idle)  # the other accepted socket's transport failed: its protocol never starts
    assert not book.may_accept()
    later = connections.time.monotonic() + connections.START_GRACE_S + 0.1
    monkeypatch.setattr(connections.time, "monotonic", lambda: later)
    assert book.may_accept() and book.admit() and idle.closed


def test_the_bound_leaves_descriptors_for_the_store_and_the_model() -> None:
    for limit in (128, 256, 1024, 65536):
        budget = descriptor_budget(limit)
        assert budget.connections + budget.reserved <= limit and budget.reserved >= RESERVED_FDS_MIN
        assert str(limit) in budget.sentence() and str(budget.connections) in budget.sentence()
    assert descriptor_budget(1024).connections == 1024 - 1024 // 8
