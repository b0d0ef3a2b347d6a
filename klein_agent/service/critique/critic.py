"""`Critic`: compare_images and the verdicts over the store, with plain values in and out (no MCP), as `Studio` is
for the image tools. The comparison itself is the pure function `compare.compare`; this reads the pictures.

Stored pictures never change under their id, so the decoded pictures of recent comparisons are kept (bounded in
bytes): an agent compares every edit with the same input, and a PNG decode costs about as much as the comparison.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import anyio
from PIL import Image

from klein_agent.rules.image_refs import require_image_id
from klein_agent.rules.limits import CRITIQUE_CACHE_BYTES
from klein_agent.rules.masks import Box
from klein_agent.rules.resolution import RequestError, check_session
from klein_agent.service.critique.compare import Comparison, compare
from klein_agent.service.store import ImageStore, StoredImage, VerdictRecord, Verdicts


@dataclass(frozen=True)
class Compared:
    """The two images compared (their store records) and the comparison of a's pixels to b's."""

    a: StoredImage
    b: StoredImage
    comparison: Comparison


class Critic:
    """compare_images and verdicts over one store. Thread-safe; each call runs on a worker thread."""

    def __init__(self, store: ImageStore, *, cache_bytes: int = CRITIQUE_CACHE_BYTES) -> None:
        self.store = store
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._lock = threading.Lock()

    async def compare(self, a: str, b: str, *, expected: Box | None = None) -> Compared:
        """Compare stored image `a` (before) with `b` (after): ids or image://<id>. `expected` is the box the
        caller meant to change, in px of b or fractions. Raises UnknownImageError (naming the id), RequestError
        (`compare.compare`'s: a picture under 16 px, other aspect ratios, a bad box)."""
        a_id, b_id = require_image_id(a), require_image_id(b)

        def run() -> Compared:
            a_meta, b_meta = self.store.get(a_id), self.store.get(b_id)
            a_pic, b_pic = self._picture(a_id), self._picture(b_id)
            return Compared(a_meta, b_meta, compare(a_pic, b_pic, expected=expected, names=(a_id, b_id)))

        return await anyio.to_thread.run_sync(run)

    async def list_images(
        self, session: str | None, limit: int, cursor: str | None, standing: str | None
    ) -> tuple[list[StoredImage], str | None, dict[str, Verdicts]]:
        """`Studio.list_images` with the `standing` filter ("pick", "reject" or None for all): one page, newest
        first, the next page's cursor (None at the end), and the verdicts of the page's images. Raises
        RequestError for a bad session, standing or cursor (the store's message)."""
        session = check_session(session)

        def run() -> tuple[list[StoredImage], str | None, dict[str, Verdicts]]:
            page, next_cursor = self.store.list_images(
                session=session, limit=limit, cursor=cursor, standing=standing
            )
            return page, next_cursor, self.store.verdicts([i.image_id for i in page])

        try:
            return await anyio.to_thread.run_sync(run)
        except ValueError as exc:  # a malformed or foreign cursor; the store's message says what to pass
            if isinstance(exc, RequestError):
                raise
            raise RequestError(str(exc)) from exc

    async def record_verdict(self, image_id: str, verdict: str, reason: str | None) -> VerdictRecord:
        """Record a verdict on a stored image (`ImageStore.record_verdict`; same errors)."""
        image_id = require_image_id(image_id)
        return await anyio.to_thread.run_sync(lambda: self.store.record_verdict(image_id, verdict, reason))

    async def verdicts(self, image_ids: list[str]) -> dict[str, Verdicts]:
        """The standing verdict and newest notes of each of these stored images that has any."""
        return await anyio.to_thread.run_sync(lambda: self.store.verdicts(image_ids))

    def _picture(self, image_id: str) -> Image.Image:
        """The stored picture as RGB, from the cache or decoded (then cached, oldest dropped past the bound)."""
        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        with Image.open(io.BytesIO(self.store.read_png(image_id)), formats=["PNG"]) as im:
            picture = im.convert("RGB")
        with self._lock:
            self._cache[image_id] = picture
            while sum(_nbytes(p) for p in self._cache.values()) > self._cache_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return picture


def _nbytes(picture: Image.Image) -> int:
    return picture.width * picture.height * 4  # Pillow keeps RGB as 4 bytes a pixel
