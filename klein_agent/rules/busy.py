"""The one "busy" refusal: what a client reads when no call can be queued, from the local engine's queue or from
the queue a front-end keeps for a Ray Serve application's replicas (`max_queued_requests`), and the error a
generator raises for the second case so the engine can say it in the same words. No torch, no Ray.
"""

from __future__ import annotations


class GeneratorBusyError(RuntimeError):
    """A generator that fronts a pool of replicas refused a call at once: `queued` calls of this front-end were
    already waiting for a replica (Ray Serve's BackPressureError). The engine answers it with `busy_message`."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"{queued} calls are queued for the replicas")
        self.queued = queued


def retry_after_s(waiting: int, mean_call_s: float | None, slots: int = 1) -> int | None:
    """Seconds until a place in the queue is likely free: the `waiting` calls ahead plus the running ones, each
    taking the mean of recent calls (`mean_call_s`, None when no call has finished yet: then no estimate), `slots`
    of them at once (the calls the generator takes at a time, `rules.requests.max_in_flight`). At least 1."""
    if mean_call_s is None:
        return None
    return max(1, round(mean_call_s * (waiting / max(1, slots) + 1)))


def busy_message(state: str, waiting: int, mean_call_s: float | None, slots: int = 1) -> str:
    """ "busy: <state>; retry in ~S s, or ask for fewer images per call" (S from `retry_after_s`; "in a few
    seconds" before any call has finished). `state` says what is waiting, e.g. "3 calls are queued and one is
    running" (`queue_state`)."""
    after = retry_after_s(waiting, mean_call_s, slots)
    retry = "retry in a few seconds" if after is None else f"retry in ~{after} s"
    return f"busy: {state}; {retry}, or ask for fewer images per call"


def queue_state(waiting: int, running: int) -> str:
    """What is waiting in an engine's own queue: `waiting` calls behind `running` ones ("one" when it is one, as
    the embedded server has always said)."""
    ran = "one is running" if running == 1 else f"{running} are running"
    return f"{waiting} calls are queued and {ran}"


def replica_state(queued: int) -> str:
    """What is waiting when the replicas' queue refused a call: `queued` calls of this front-end."""
    return f"{queued} call{'s' if queued != 1 else ''} are queued for the model's replicas"
