"""Sentences the tool descriptions share, built from the studio's own settings so they stay true."""

from __future__ import annotations

from klein_agent.service.studio import Studio


def store_note(studio: Studio) -> str:
    """How long results are kept: every description of a tool that returns ids says it."""
    store = studio.store
    return (
        f"Results are kept in a persistent store across restarts and referenced by id (img_...); beyond "
        f"{store.max_images} images or {store.max_bytes / 2**30:.1f} GiB the least recently used are removed."
    )


def inputs_note(studio: Studio) -> str:
    """The forms an image argument may take on this server."""
    urls = ", an http(s) URL" if studio.policy.allow_urls else ""
    return (
        "Images are given as an id (img_... or image://<id>), an absolute PNG/JPEG/WebP path in a folder the "
        f"server may read{urls} or a data:image/...;base64 URI; paths and URIs are imported into the store first."
    )
