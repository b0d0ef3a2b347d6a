"""`S3BlobStore`: the `BlobStore` (blobs.py) in an S3-compatible bucket, one object per blob under one prefix.

    s3://BUCKET/PREFIX/<key>    one blob (keys are sha256 hex + ".png", `records.blob_key`)

Why obstore and not boto3: one Rust extension of 16 MB whose only dependency is typing-extensions (boto3 with
botocore and friends is 37 MB), a client made in 36 ms, a native async API for the front-ends to come, and
create-only puts (`mode="create"`: If-None-Match: *, so a put never replaces a blob). Imported only when an
s3:// blob store is chosen (the `scale` extra).

A put is one PUT request per try (no multipart: a PNG of the largest allowed size fits one request), so S3 never
holds part of a blob and `sweep_partial` has nothing to do; a put that dies before its row is committed leaves a
whole object without a row, which `ImageStore.sweep` deletes once it is older than any put in flight. Tries are
repeated on transient failures within `limits.S3_PUT_DEADLINE_S` (`put`; what counts as transient: s3_errors.py).

Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN); they are required, so the
client never falls back to the instance metadata service (169.254.169.254), and AWS_EC2_METADATA_DISABLED=true is
set for any other SDK in the process. They are never logged, returned or put in a message (`location` is the
bucket URL and endpoint only).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from klein_agent.rules import limits
from klein_agent.service.store.blobs import BlobInfo, BlobMissingError
from klein_agent.service.store.dsn import parse_s3_url, scrub
from klein_agent.service.store.records import StoreError, StoreWriteError
from klein_agent.service.store.s3_errors import classify

log = logging.getLogger(__name__)

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
KEY_ENV, SECRET_ENV, TOKEN_ENV = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
DEFAULT_REGION = "us-east-1"  # what S3-compatible stores accept when none is set


class S3BlobStore:
    """Blobs as objects under `s3://BUCKET/PREFIX`. `endpoint` (else $AWS_ENDPOINT_URL, else AWS) names an
    S3-compatible server (path-style requests; http:// allowed only when the endpoint says so). Raises StoreError
    naming what is missing (keys) or wrong (the URL); the bucket is checked with one listing request."""

    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        read_only: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        try:
            self.bucket, self.prefix = parse_s3_url(url)
        except ValueError as e:
            raise StoreError(str(e)) from None
        key, secret = env.get(KEY_ENV, "").strip(), env.get(SECRET_ENV, "").strip()
        if not key or not secret:
            raise StoreError(
                f"--blobs {url}: set {KEY_ENV} and {SECRET_ENV} (the keys of the bucket's user). Keys are required, "
                "so no request goes to a cloud metadata service to look for others."
            )
        # keys are explicit: no SDK in this process may ask the metadata service for others
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        self._secrets = (secret, env.get(TOKEN_ENV, "").strip() or None)
        endpoint = (endpoint or env.get(ENDPOINT_ENV, "")).strip() or None
        self.read_only = read_only
        self.location = f"s3://{self.bucket}/{self.prefix}" + (f" at {endpoint}" if endpoint else "")
        config: dict[str, Any] = {
            "access_key_id": key,
            "secret_access_key": secret,
            "region": next((env[n] for n in REGION_ENVS if env.get(n, "").strip()), DEFAULT_REGION),
        }
        if self._secrets[1]:
            config["session_token"] = self._secrets[1]
        if endpoint:
            config["endpoint"] = endpoint
            config["virtual_hosted_style_request"] = False
        try:
            self._store = S3Store(
                self.bucket,
                prefix=self.prefix or None,
                config=config,  # type: ignore[arg-type]
                client_options={
                    "allow_http": bool(endpoint and endpoint.lower().startswith("http://")),
                    "connect_timeout": timedelta(seconds=limits.S3_CONNECT_TIMEOUT_S),
                    "timeout": timedelta(seconds=limits.S3_REQUEST_TIMEOUT_S),
                },
                retry_config={
                    "max_retries": limits.S3_MAX_RETRIES,
                    "retry_timeout": timedelta(seconds=limits.S3_RETRY_TIMEOUT_S),
                },
            )
            next(
                iter(obstore.list(self._store, chunk_size=1)), None
            )  # reachable, keys accepted, bucket there
        except (BaseError, ValueError, OSError) as e:
            raise StoreError(
                f"Cannot use the blob store {self.location}: {self._scrub(e)}. Check the bucket, the endpoint "
                f"(--s3-endpoint or {ENDPOINT_ENV}) and the keys."
            ) from None

    def put(self, key: str, data: bytes) -> None:
        """Create-only PUTs (If-None-Match: *) of `data` under `key` until one is answered, retrying a transient
        failure (timeout, no connection, broken connection, 5xx) with a doubling pause. No new try starts after
        `limits.S3_PUT_DEADLINE_S`, so it returns or raises within that plus the last try (obstore's own retries:
        `limits.S3_RETRY_TIMEOUT_S` plus one request timeout). A 412 is success when the object there holds exactly
        `data` (an earlier try of this put landed and its answer was lost), else StoreWriteError. Raises
        StoreWriteError saying which failure it was (each try's is logged in full); nothing this put wrote stays
        reachable (a try that lands after it gave up is an orphan the sweep removes)."""
        if self.read_only:
            raise StoreError(f"The blob store {self.location} is open read-only.")
        path = _checked(key)
        began = time.monotonic()
        pause, tries = limits.S3_PUT_BACKOFF_S, 0
        while True:
            tries += 1
            try:
                obstore.put(self._store, path, data, mode="create", use_multipart=False)
                return
            except (BaseError, OSError) as e:
                failure = classify(e)
                log.warning(
                    "blob store: PUT %s in %s, try %d: %s: %s",
                    key,
                    self.location,
                    tries,
                    failure.kind,
                    scrub(str(e), *self._secrets),
                )
            retry = failure.transient
            if failure.kind == "exists":
                held = self._holds(path, data)
                if held is True:
                    return
                if held is False:
                    raise StoreWriteError(
                        f"Could not save the image in {self.location}: an object named {key} is there already "
                        "with other bytes (blob keys are fresh; another store may share this prefix). Use a prefix "
                        "of its own."
                    )
                retry = True  # it could not be read back now: the next try's 412 asks again
            elapsed = time.monotonic() - began
            if retry and elapsed + pause < limits.S3_PUT_DEADLINE_S:
                time.sleep(pause)
                pause = min(pause * 2, limits.S3_PUT_BACKOFF_MAX_S)
                continue
            raise StoreWriteError(
                f"Could not save the image in {self.location}: {failure.what_happened()}"
                + (f" ({tries} tries in {elapsed:.0f} s)" if tries > 1 else "")
                + f". The image was not saved. {failure.what_to_do()}"
            )

    def _holds(self, path: str, data: bytes) -> bool | None:
        """Whether the object at `path` is exactly `data` (None: it could not be read now). Reads it only when its
        size matches, so this costs at most len(data) more memory."""
        try:
            if int(obstore.head(self._store, path)["size"]) != len(data):
                return False
            return bytes(obstore.get(self._store, path).bytes()) == data
        except (BaseError, OSError) as e:
            log.warning("blob store: cannot read back %s in %s: %s", path, self.location, self._scrub(e))
            return None

    def get(self, key: str) -> bytes:
        """The object's bytes. Raises BlobMissingError or StoreError."""
        try:
            return bytes(obstore.get(self._store, _checked(key)).bytes())
        except (NotFoundError, FileNotFoundError):  # obstore raises the builtin for a 404
            raise BlobMissingError(f"no blob {key} in {self.location}") from None
        except (BaseError, OSError) as e:
            raise StoreError(f"Cannot read {key} from {self.location}: {self._scrub(e)}.") from None

    def size(self, key: str) -> int | None:
        """The object's size, or None when it is absent (or cannot be asked now: logged)."""
        try:
            return int(obstore.head(self._store, _checked(key))["size"])
        except (NotFoundError, FileNotFoundError):  # obstore raises the builtin for a 404
            return None
        except (BaseError, OSError) as e:
            log.warning("blob store: cannot look up %s in %s: %s", key, self.location, self._scrub(e))
            return None

    def delete(self, key: str) -> None:
        """Delete the object; a failure is logged (the sweep retries)."""
        try:
            obstore.delete(self._store, _checked(key))
        except (NotFoundError, FileNotFoundError):  # obstore raises the builtin for a 404
            pass
        except (BaseError, OSError) as e:
            log.warning("blob store: cannot delete %s from %s: %s", key, self.location, self._scrub(e))

    def inventory(self) -> dict[str, BlobInfo]:
        """Every object directly under the prefix, by key, with its size and LastModified; deeper objects are
        not this store's (logged, left alone)."""
        found: dict[str, BlobInfo] = {}
        try:
            for chunk in obstore.list(self._store, chunk_size=1000):
                for meta in chunk:
                    path = meta["path"]
                    if "/" in path:
                        log.warning(
                            "blob store: ignoring %s under %s (not a blob of this store)", path, self.location
                        )
                        continue
                    found[path] = BlobInfo(int(meta["size"]), meta["last_modified"].timestamp())
        except (BaseError, OSError) as e:
            raise StoreError(f"Cannot list the blob store {self.location}: {self._scrub(e)}.") from None
        return found

    def sweep_partial(self, min_age_s: float) -> int:
        """Nothing: puts are single requests, so S3 never keeps part of one."""
        return 0

    def close(self) -> None:
        """Nothing is held open between calls (the client's connection pool goes with the object)."""

    def _scrub(self, error: BaseException) -> str:
        return scrub(
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__, *self._secrets
        )


def _checked(key: str) -> str:
    if key in ("", ".", "..") or "/" in key or "\\" in key or "\0" in key:
        raise ValueError(f"not a blob key: {key!r}")
    return key
