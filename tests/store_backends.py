"""The store backends the interface tests run over, by name: each opens an `ImageStore` over one Catalog and one
BlobStore at a location. Today only the local pair; a PostgreSQL catalog and an S3-compatible blob store join here
(with a fixture that starts their servers) and every test in tests/test_store_interfaces.py runs over them too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from klein_agent.service.store import ImageStore
from klein_agent.service.store.folder_blobs import FolderBlobStore
from klein_agent.service.store.sqlite_catalog import SQLiteCatalog


def sqlite_folder(root: Path, **options: Any) -> ImageStore:
    """SQLiteCatalog + FolderBlobStore in `root`, composed explicitly (what ImageStore(root) does)."""
    root.mkdir(parents=True, exist_ok=True)
    blobs = FolderBlobStore(root / "images")
    catalog = SQLiteCatalog(root)
    return ImageStore.over(catalog, blobs, root=root, **options)


BACKENDS: dict[str, Callable[..., ImageStore]] = {"sqlite+folder": sqlite_folder}
