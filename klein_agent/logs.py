"""Logging for every command: one stderr handler, our messages at the level the user chose, other libraries' only
from WARNING up (their INFO lines are noise to a user and would bury ours). stdout stays free for the MCP wire.
No torch, no MCP: the CLI configures logging before it knows which command runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
OUR_LOGGER = "klein_agent"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def configure_logging(level: str = "INFO") -> None:
    """Send logging to stderr: klein-agent's at `level`, everything else at WARNING or above (or at `level` when
    that is higher). Replaces handlers set before, so calling it twice does not print lines twice.

    Library progress bars and advice are switched off: they would clutter stderr, and some write to stdout.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    numeric = logging.getLevelName(level)
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger(OUR_LOGGER).setLevel(numeric)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
