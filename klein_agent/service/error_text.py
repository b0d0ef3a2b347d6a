"""An exception as a person or an agent reads it: what went wrong, without Python's class names.

Texts that reach a client (tool errors, server_status, the log's one-line errors) describe a failure with
`describe`; the class name and the traceback stay in the server log (`log.exception`), where they help.
"""

from __future__ import annotations


def describe(exc: BaseException) -> str:
    """The message of `exc` as a phrase to embed in a sentence: no class name, no trailing period (the caller's
    sentence goes on), an OSError's reason and file rather than its `[Errno n]` form, and a plain phrase for an
    exception that carries no message."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc).strip()
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = f"missing {text}"
    text = text.rstrip(". ")
    if text:
        return text
    if isinstance(exc, MemoryError):
        return "out of memory"
    return "an unexpected error (the server log has the details)"
