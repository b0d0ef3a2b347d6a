"""What a replica streams back for one call, and how a failure crosses the process boundary.

The replica yields tuples: ("progress", done, total, message) per unit, then ("result", GenerationResult) or
("error", kind, message). Errors travel as a kind and a message, not as the exception object: a torch
OutOfMemoryError would need torch to unpickle in the front-end, and the engine recognises its failures by class
(`RequestError`, `NonFiniteOutputError`) and by an out-of-memory name or message (`is_out_of_memory`), so the
front-end raises the same classes with the same messages and the client reads the sentence a local model gives.
No torch here.
"""

from __future__ import annotations

from typing import Any

from klein_agent.rules.requests import GenerationRequest, NonFiniteOutputError
from klein_agent.rules.resolution import RequestError

PROGRESS, RESULT, ERROR = "progress", "result", "error"


class ReplicaDeadlineError(RuntimeError):
    """A replica stopped a call that ran past its deadline (`limits.REPLICA_DEADLINE_S`)."""


class ReplicaLostError(RuntimeError):
    """The replica running a call died, and so did the one it was retried on; nothing of the call was kept."""


class ReplicaError(RuntimeError):
    """An unexpected failure on the replica; the message names it (the replica's log has the traceback)."""


def out_of_memory(exc: BaseException) -> bool:
    """The engine's rule (service/engine.py `is_out_of_memory`), applied on the replica, where the class exists."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def error_event(exc: BaseException) -> tuple[str, str, str]:
    """The event that carries `exc` to the front-end: ("error", kind, message)."""
    if isinstance(exc, RequestError):
        kind = "request"
    elif isinstance(exc, NonFiniteOutputError):
        kind = "non_finite"
    elif isinstance(exc, ReplicaDeadlineError):
        kind = "deadline"
    elif out_of_memory(exc):
        kind = "out_of_memory"
    else:
        return ERROR, "other", f"{type(exc).__name__}: {exc}"
    return ERROR, kind, str(exc)


def raise_error(kind: str, message: str) -> None:
    """Raise what the replica raised, as the engine expects it from a local model: RequestError,
    NonFiniteOutputError, MemoryError (out of memory), ReplicaDeadlineError or ReplicaError."""
    exc: Exception
    if kind == "request":
        exc = RequestError(message)
    elif kind == "non_finite":
        exc = NonFiniteOutputError(message)
    elif kind == "out_of_memory":
        exc = MemoryError(message)
    elif kind == "deadline":
        exc = ReplicaDeadlineError(message)
    else:
        exc = ReplicaError(f"on the replica: {message}")
    raise exc


def describe_event(event: Any) -> str:
    """A short text of an unexpected event, for the error that reports it (never its images)."""
    return repr(event[0] if isinstance(event, tuple) and event else type(event).__name__)[:80]


def call_name(request: GenerationRequest) -> str:
    """How the front-end's and the replica's logs name a call: its idempotency key (the client's, or the one the
    studio minted), so one call's lines can be found on both sides."""
    return repr(request.call_id) if request.call_id else "(no call id)"
