"""The one error loading raises on purpose."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message says what is wrong and where."""
