"""What an S3 request's failure was, in the words a person can act on: the one reading of obstore's errors that
`S3BlobStore` (s3_blobs.py) retries on and writes its messages from.

obstore raises a typed error for what S3 answers with a meaning (404, 412, 401/403) and `GenericError` for the
rest; for those, the transport failure (`kind: Timeout`, `kind: Connect`, ...) and the HTTP status are only in its
text (the Rust error's Debug form), so they are read from there. What cannot be read stays "other" and is never
retried: a failure not understood is reported at once rather than repeated for a minute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from obstore.exceptions import (
    AlreadyExistsError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)

from klein_agent.rules import limits

# reqwest's error kinds as object_store's HttpErrorKind names them in the error's Debug text
_KIND = re.compile(r"\bkind: (Timeout|Connect|Request|Interrupted|Decode|Unknown)\b")
_STATUS = re.compile(r"status code: (\d{3})\b|\bstatus: (\d{3})\b")


@dataclass(frozen=True)
class S3Failure:
    """One failed request, classified. `kind` is one of: "timeout" (no answer within the request timeout),
    "refused" (no connection: nothing listens, or the host is unreachable), "interrupted" (the connection broke
    mid-request), "server" (a 5xx answer: the server's own trouble), "denied" (401/403: the keys), "missing"
    (404: no such bucket or object), "exists" (412: If-None-Match failed), "other". `status` is the HTTP status
    when one came back."""

    kind: str
    status: int | None = None

    @property
    def transient(self) -> bool:
        """Whether the same request may succeed if sent again in a moment."""
        return self.kind in ("timeout", "refused", "interrupted", "server")

    def what_happened(self) -> str:
        """A clause saying what went wrong, for "Could not save the image in X: <clause>"."""
        if self.kind == "timeout":
            return f"the server did not answer within {limits.S3_REQUEST_TIMEOUT_S:g} s"
        if self.kind == "refused":
            return "no connection could be made to the endpoint (refused or unreachable)"
        if self.kind == "interrupted":
            return "the connection broke before the server answered"
        if self.kind == "server":
            return f"the server answered with an error of its own (HTTP {self.status})"
        if self.kind == "denied":
            return f"the server refused these keys (HTTP {self.status or '401/403'})"
        if self.kind == "missing":
            return "the server says the bucket or object does not exist (HTTP 404)"
        if self.kind == "exists":
            return "an object with this name is there already (HTTP 412)"
        return "the request failed"

    def what_to_do(self) -> str:
        """A sentence saying what to check, matching `kind`."""
        if self.kind in ("timeout", "server", "interrupted"):
            return "Check that the S3 server is up and not overloaded (its log says more)."
        if self.kind == "refused":
            return "Check that the S3 server runs and that the endpoint (--s3-endpoint or AWS_ENDPOINT_URL) is right."
        if self.kind == "denied":
            return "Check that the keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) may write to the bucket."
        if self.kind == "missing":
            return "Check the bucket name in --blobs."
        return "Check that the bucket is reachable and writable with these keys."


def classify(error: BaseException) -> S3Failure:
    """Read an obstore (or OS) error into an S3Failure. Never raises."""
    text = str(error)
    found = _STATUS.search(text)
    status = int(found.group(1) or found.group(2)) if found else None
    if isinstance(error, (AlreadyExistsError, PreconditionError, FileExistsError)):
        return S3Failure("exists", status or 412)
    if isinstance(error, (NotFoundError, FileNotFoundError)):
        return S3Failure("missing", status or 404)
    if isinstance(error, (PermissionDeniedError, UnauthenticatedError, PermissionError)):
        return S3Failure("denied", status)
    if status is not None and 500 <= status < 600:
        return S3Failure("server", status)
    kind = _KIND.search(text)
    if kind is not None:
        name = kind.group(1)
        if name == "Timeout" or isinstance(error, TimeoutError):
            return S3Failure("timeout", status)
        if name == "Connect":
            return S3Failure("refused", status)
        if name in ("Request", "Interrupted"):
            return S3Failure("interrupted", status)
    if isinstance(error, TimeoutError):
        return S3Failure("timeout", status)
    if isinstance(error, ConnectionRefusedError):
        return S3Failure("refused", status)
    if isinstance(error, ConnectionError):
        return S3Failure("interrupted", status)
    return S3Failure("other", status)
