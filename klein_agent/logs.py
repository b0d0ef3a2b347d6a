"""Logging for every command: one stderr handler, our messages at the level the user chose, other libraries' only
from WARNING up (their INFO lines are noise to a user and would bury ours). stdout stays free for the MCP wire.
Repeats are rate-limited on that handler, for every logger (`RepeatFilter`): a failure that happens thousands of
times a second (a connection flood) is one line and a count, not a traceback each.
No torch, no MCP: the CLI configures logging before it knows which command runs."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
OUR_LOGGER = "klein_agent"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REPEAT_INTERVAL_S = 10.0  # a kind of record logged more often than once in this long is summarised


def parse_level(text: str) -> str:
    """`--log-level` as typed, in any case, as one of LEVELS; raises argparse.ArgumentTypeError otherwise."""
    level = text.strip().upper()
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level: use {', '.join(LEVELS)}")
    return level


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler that writes to whatever `sys.stderr` is at the time of each record, not the stream it was made
    with: a record from a worker thread after stderr was replaced (a redirect, a test's capture) still lands."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass


@dataclass
class _Interval:
    start: float  # when this kind's interval began
    first: logging.LogRecord  # the record that began it (the summary quotes its first line)
    held: int = 0  # records of this kind held back since


class RepeatFilter(logging.Filter):
    """Lets the first record of each kind through, counts the rest for `interval_s` seconds, then hands one
    summary record ("... (repeated N times in the last T s)") to `emit` and counts again; a kind that stays quiet
    for an interval starts afresh.

    A kind is the logger, the level, the message template (`record.msg` before its arguments, so "%d connections"
    is one kind whatever the number), the exception's type and the record's `repeat_key` if it has one: a line
    about one call, logged with `extra={"repeat_key": call}`, is a kind of its own, so every call gets its line.
    Summaries of kinds that went quiet are emitted with the next record of any kind, and by `flush` (called at
    exit).
    """

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        interval_s: float = REPEAT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.emit = emit
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple[object, ...], _Interval] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """True for the first record of its kind in an interval (and for our own summaries)."""
        if getattr(record, "repeat_summary", False):
            return True
        kind = (
            record.name,
            record.levelno,
            str(record.msg),
            record.exc_info[0] if record.exc_info else None,
            getattr(record, "repeat_key", None),
        )
        with self._lock:
            now = self.clock()
            due = self._due(now, everything=False)
            interval = self._kinds.get(kind)
            if interval is None:
                self._kinds[kind] = _Interval(now, record)
            else:
                interval.held += 1
        for summary in due:
            self.emit(summary)
        return interval is None

    def flush(self) -> None:
        """Emit the summaries of every kind still counting (at exit)."""
        with self._lock:
            due = self._due(self.clock(), everything=True)
        for summary in due:
            self.emit(summary)

    def _due(self, now: float, *, everything: bool) -> list[logging.LogRecord]:
        """Summaries of the intervals ended by `now` (all, with `everything`); those kinds count afresh, or are
        forgotten if nothing was held back."""
        due: list[logging.LogRecord] = []
        for kind, interval in list(self._kinds.items()):
            if now - interval.start < self.interval_s and not everything:
                continue
            if not interval.held:
                del self._kinds[kind]
                continue
            first = interval.first
            message = first.getMessage()
            summary = logging.makeLogRecord(
                {
                    "name": first.name,
                    "levelno": first.levelno,
                    "levelname": first.levelname,
                    "msg": "%s (repeated %d times in the last %.0f s)",
                    "args": (message.splitlines()[0] if message else "", interval.held, now - interval.start),
                    "repeat_summary": True,
                }
            )
            due.append(summary)
            self._kinds[kind] = _Interval(now, first)
        return due


class _ForwardHandler(logging.Handler):
    """Hands each record to another logger's handlers, as if logged there (its filters and format apply), when
    that logger's level allows it: `Logger.handle` does not check the level, and the host may set it (Serve's
    `logging_config.log_level`)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target
        self.repeats = RepeatFilter(self.handle)
        self.addFilter(self.repeats)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.target.getEffectiveLevel():
            self.target.handle(record)


def forward_ours(target: logging.Logger, level: str = "INFO") -> None:
    """Send klein-agent's records to `target`'s handlers instead of the root's: ours at `level` and up (one of
    LEVELS; ValueError otherwise) and at `target`'s own level and up, repeats rate-limited (`RepeatFilter`) as
    `configure_logging` does. For a process whose host owns the log files: a Ray Serve replica hands them to
    Serve's logger, so they land in the replica's own log beside its access lines. Our logger stops propagating
    to the root (which would print each line a second time) until `configure_logging` runs; calling this again
    replaces the forward set before."""
    if level not in LEVELS:
        raise ValueError(f"{level!r} is not a log level: use {', '.join(LEVELS)}")
    ours = logging.getLogger(OUR_LOGGER)
    _drop_forwards(ours)
    forward = _ForwardHandler(target)
    atexit.register(forward.repeats.flush)
    ours.addHandler(forward)
    ours.setLevel(level)
    # the host's handlers have our records now; the root's (or Python's last resort) would print them twice
    ours.propagate = False


def _drop_forwards(ours: logging.Logger) -> None:
    """Remove the forwards `forward_ours` set on `ours`, their held counts flushed, and let it propagate again."""
    for handler in list(ours.handlers):
        if isinstance(handler, _ForwardHandler):
            handler.repeats.flush()
            atexit.unregister(handler.repeats.flush)
            ours.removeHandler(handler)
    ours.propagate = True


def configure_logging(level: str = "INFO") -> None:
    """Send logging to stderr: klein-agent's at `level`, everything else at WARNING or above (or at `level` when
    that is higher), repeats rate-limited (`RepeatFilter`). Replaces handlers set before, so calling it twice does
    not print lines twice.

    Library progress bars and advice are switched off: they would clutter stderr, and some write to stdout.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    _drop_forwards(logging.getLogger(OUR_LOGGER))  # ours reach the root's handler again
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    repeats = RepeatFilter(handler.handle)
    handler.addFilter(repeats)
    atexit.register(repeats.flush)
    root.addHandler(handler)
    numeric = logging.getLevelName(level)
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger(OUR_LOGGER).setLevel(numeric)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
