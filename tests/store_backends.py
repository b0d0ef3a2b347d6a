"""The store backends the interface tests run over, by name: each opens an `ImageStore` over one Catalog and one
BlobStore at a location (`root`, a fresh folder per test).

    sqlite+folder    SQLiteCatalog + FolderBlobStore in root, composed explicitly (what ImageStore(root) does)
    postgresql+s3    PostgresCatalog + S3BlobStore through `open_store`, one database and one key prefix per root,
                     on the servers tests/store_servers.py starts; present only in the private-network child pytest
                     (tests/test_store_scaleout.py starts it), whose environment names the servers

`MIGRATIONS[name]` is the migration list of each backend's catalog (the tests add a probe step to it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from klein_agent.service.store import ImageStore, migrations, pg_migrations
from klein_agent.service.store.folder_blobs import FolderBlobStore
from klein_agent.service.store.sqlite_catalog import SQLiteCatalog
from tests import store_servers


def sqlite_folder(root: Path, **options: Any) -> ImageStore:
    """SQLiteCatalog + FolderBlobStore in `root`, composed explicitly (what ImageStore(root) does)."""
    root.mkdir(parents=True, exist_ok=True)
    blobs = FolderBlobStore(root / "images")
    catalog = SQLiteCatalog(root)
    return ImageStore.over(catalog, blobs, root=root, **options)


def shared_names(root: Path) -> tuple[str, str]:
    """(DSN, s3:// URL) of the database and prefix that belong to `root`: the same for every process."""
    tag = "k" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:20]
    dsn = store_servers.database_for(os.environ[store_servers.PG_ADMIN_ENV], tag)
    return dsn, f"s3://{store_servers.S3_BUCKET}/{tag}"


def postgres_s3(root: Path, **options: Any) -> ImageStore:
    """PostgresCatalog + S3BlobStore for `root` (see `shared_names`), opened as `serve --store DSN --blobs URL`."""
    from klein_agent.service.store.open import open_store

    dsn, url = shared_names(root)
    endpoint = os.environ[store_servers.S3_ENDPOINT_ENV]
    env = store_servers.s3_environment(endpoint)
    return open_store(dsn, url, root=root, s3_endpoint=endpoint, environ=env, **options)


BACKENDS: dict[str, Callable[..., ImageStore]] = {"sqlite+folder": sqlite_folder}
MIGRATIONS: dict[str, Any] = {"sqlite+folder": migrations}
if store_servers.in_private_network():
    BACKENDS["postgresql+s3"] = postgres_s3
    MIGRATIONS["postgresql+s3"] = pg_migrations
