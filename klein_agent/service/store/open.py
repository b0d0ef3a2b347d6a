"""`open_store`: an `ImageStore` from what a user typed, `--store PATH|postgresql://…` and `--blobs s3://…`.

    --store PATH                              the embedded store: SQLite + a folder (exactly `ImageStore(PATH)`)
    --store postgresql://… --blobs s3://B/P   PostgresCatalog + S3BlobStore, shared by many front-ends

The two shared backends go together: a PostgreSQL catalog read by front-ends on other hosts needs blobs they can
all reach, and an embedded store's rows must not point at blobs another store's sweep may delete. So a DSN without
`--blobs`, or `--blobs` with a folder, is refused with a message saying what to add or remove.

The shared backends are imported here only when chosen (psycopg and obstore come with the `scale` extra), so the
embedded default imports nothing new. Secrets (the DSN's password, the S3 keys) never reach a message: the DSN is
shown redacted (`dsn.redact_dsn`), and the keys are read from the environment by `S3BlobStore`, never echoed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from klein_agent.service.store.dsn import is_dsn, is_s3_url, redact_dsn
from klein_agent.service.store.image_store import ImageStore
from klein_agent.service.store.records import StoreError

SCALE_EXTRA_HINT = "install the scale extra: pip install 'klein-agent[scale]'"


def is_shared(store: str | Path) -> bool:
    """Whether `store` names a shared catalog (a PostgreSQL DSN) rather than a local folder."""
    return is_dsn(str(store))


def open_store(
    store: str | Path,
    blobs: str | None = None,
    *,
    root: Path | None = None,
    s3_endpoint: str | None = None,
    read_only: bool = False,
    environ: Mapping[str, str] | None = None,
    **bounds: Any,
) -> ImageStore:
    """Open the store `store` names: a folder (the embedded store; `blobs` must be None), or a PostgreSQL URL
    (`postgresql://` or `postgres://`) with `blobs` = `s3://BUCKET/PREFIX`. `root` is the local folder a shared
    store keeps its neighbours in (thumbnails; the path policy closes it to tools), created if missing;
    `s3_endpoint` names an S3-compatible server (else $AWS_ENDPOINT_URL, else AWS); `environ` (default os.environ)
    holds the AWS_* keys. `bounds` are `ImageStore`'s (max_bytes, max_images, lease_ttl_s, ...).

    Raises StoreError naming the option and the fix: a DSN without --blobs, --blobs without a DSN, a missing
    extra, an unreachable or refusing server (the password and keys never appear in it)."""
    if not is_shared(store):
        if blobs is not None:
            raise StoreError(
                f"--blobs {blobs} goes with --store postgresql://…: the embedded store (--store {store}) keeps "
                "its images in its own folder. Drop --blobs, or pass a PostgreSQL URL as --store."
            )
        return ImageStore(Path(store), read_only=read_only, **bounds)
    dsn = str(store).strip()
    if blobs is None or not is_s3_url(blobs):
        given = "no --blobs" if blobs is None else f"--blobs {blobs}"
        raise StoreError(
            f"--store {redact_dsn(dsn)} needs --blobs s3://BUCKET/PREFIX (got {given}): every front-end on a "
            "shared catalog must reach the same image bytes."
        )
    if root is None:
        raise StoreError("A shared store needs a local folder for its thumbnails (root); none was given.")
    try:
        from klein_agent.service.store.pg_catalog import PostgresCatalog
        from klein_agent.service.store.s3_blobs import S3BlobStore
    except ImportError as e:
        raise StoreError(
            f"--store {redact_dsn(dsn)} needs psycopg and obstore ({e.name} is missing): {SCALE_EXTRA_HINT}."
        ) from None
    if not read_only:
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StoreError(f"Cannot create the store's local folder {root}: {e.strerror or e}.") from None
    catalog = PostgresCatalog(dsn, read_only=read_only)
    try:
        blob_store = S3BlobStore(blobs, endpoint=s3_endpoint, read_only=read_only, environ=environ)
    except BaseException:
        catalog.close()
        raise
    return ImageStore.over(catalog, blob_store, root=root, **bounds)
