"""The gallery's Starlette app: the page, its JSON, the pictures, the live feed, and a 404 page for the rest.

Everything is read-only (GET and HEAD; anything else is 405). A URL names an image only by its id, checked with the
store's id rule before any lookup; the bytes served are the store's PNG (`ImageStore.read_png`, which refuses
symlinks) or a thumbnail made from it, so nothing outside the store is ever served. Unknown ids, malformed ids and
path tricks (`..`, encoded slashes: uvicorn decodes `%2F` into a path separator, so no route matches) get the same
404 page. The page's files are read once from `static/` and served from memory by name.

Routes, relative to where the app is mounted (`/gallery`):
    /                      the page
    /static/{name}         its script, style sheet and icon
    /api/sessions          sessions, newest first, with counts; the store's total
    /api/images            a page of cards, newest first (?session=, ?cursor=, ?limit=, ?standing=pick|reject)
    /api/images/{id}       one card
    /api/verdicts          the verdicts recorded after a mark (?after=): the cards to update, and the next mark
    /image/{id}.png        the full PNG (?download=1: as an attachment)
    /thumb/{id}.webp       its WebP thumbnail
    /events                server-sent events: `change` whenever an image is stored or evicted, or a verdict recorded
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from klein_agent.gallery.catalog import card, verdict_fields
from klein_agent.gallery.thumbs import Thumbnails
from klein_agent.rules.limits import SESSION_MAX_CHARS
from klein_agent.service.store import (
    MAX_LIST_LIMIT,
    ImageStore,
    StoredImage,
    StoreError,
    UnknownImageError,
    Verdicts,
)
from klein_agent.web.guard import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PAGE_SIZE = 60  # cards per page: one screenful and a bit, so the first paint waits for little
POLL_S = 0.5  # how often the live feed looks at the store
FEED_WAIT_S = 2.0  # with a pushing catalog: the longest wait for a row before looking anyway (deletes)
MAX_MARK = 2**63 - 1  # verdict marks are 64-bit integers in both catalogs (SQLite INTEGER, PostgreSQL bigint)
STATIC = {  # name -> content type; nothing else is served from static/
    "app.js": "text/javascript; charset=utf-8",
    "verdicts.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
_ERRORS = {  # fixed texts: nothing from the request is echoed into the page
    404: "Not found: there is no such page or image in this gallery.",
    405: "The gallery is read-only: it answers GET requests only.",
}
IMMUTABLE = "private, max-age=31536000, immutable"  # an id never names another picture
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class Gallery:
    """The gallery of the store at `root`: a read-only `ImageStore`, its thumbnail cache in `thumbs` (the commands
    pass `option_types.store_locations(...).thumbs`), and `app`, the ASGI app
    to mount (the page uses relative URLs, so any prefix works; `serve --http` and `klein-agent gallery` use
    /gallery). Raises StoreError if there is no readable store at `root`. Call `close` when done."""

    def __init__(
        self,
        root: Path,
        *,
        thumbs: Path,
        poll_s: float = POLL_S,
        page_size: int = PAGE_SIZE,
        store: ImageStore | None = None,
    ) -> None:
        # `store`: a read-only store opened by the caller (a shared one: service/store/open.py), closed with this
        self.store = store if store is not None else ImageStore(root, read_only=True)
        try:
            self.thumbs = Thumbnails(self.store, thumbs)
            removed = self.thumbs.prune(self._every_image())
            if removed:
                log.info("gallery: removed %d thumbnail(s) of evicted images", removed)
        except BaseException:
            self.store.close()
            raise
        self.poll_s = poll_s
        self.page_size = page_size
        folder = resources.files("klein_agent.gallery") / "static"
        self._page = (folder / "index.html").read_bytes()
        self._error_template = (folder / "error.html").read_bytes()
        self._static = {name: (folder / name).read_bytes() for name in STATIC}
        routes = [
            Route("/", self.index),
            Route("/static/{name}", self.static),
            Route("/api/sessions", self.sessions),
            Route("/api/images", self.images),
            Route("/api/images/{image_id}", self.one_image),
            Route("/api/verdicts", self.verdict_changes),
            Route("/image/{name}", self.png),
            Route("/thumb/{name}", self.thumb),
            Route("/events", self.events),
        ]
        starlette = Starlette(
            routes=routes, exception_handlers={404: self._error_page, 405: self._error_page}
        )
        self.app = _with_headers(starlette)

    def close(self) -> None:
        """Close the read-only store. Idempotent."""
        self.store.close()

    # ---- the page ----------------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        """The page: a shell that fetches its cards from the JSON routes."""
        return Response(
            self._page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"}
        )

    async def static(self, request: Request) -> Response:
        """app.js or style.css from memory; revalidated by ETag, so a new version shows at once."""
        name = request.path_params["name"]
        if name not in STATIC:
            raise HTTPException(404)
        body = self._static[name]
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        headers = {"cache-control": "no-cache", "etag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=STATIC[name], headers=headers)

    # ---- JSON --------------------------------------------------------------------------------------------

    async def sessions(self, request: Request) -> Response:
        """{"sessions": [{session, count, first_at, last_at}], "total": images, "store": the store's folder}."""
        summaries, stats = await anyio.to_thread.run_sync(lambda: (self.store.sessions(), self.store.stats()))
        return _json(
            {
                "sessions": [
                    {"session": s.session, "count": s.count, "first_at": s.first_at, "last_at": s.last_at}
                    for s in summaries
                ],
                "total": stats.count,
                "store": str(stats.root),
            }
        )

    async def images(self, request: Request) -> Response:
        """{"images": [card, ...], "next_cursor": str | null, "verdict_mark": int}: newest first, of one session
        if `session` is given. `verdict_mark` was read before the cards' verdicts: the page asks /api/verdicts
        for what was recorded after it. A bad cursor, session or limit is a 400 with {"error": message}."""
        query = request.query_params
        session = query.get("session") or None
        standing = query.get("standing") or None
        try:
            limit = int(query.get("limit", self.page_size))
            if not 1 <= limit <= MAX_LIST_LIMIT:
                raise ValueError(f"limit must be from 1 to {MAX_LIST_LIMIT}")
            if session is not None and len(session) > SESSION_MAX_CHARS:
                raise ValueError(f"session is at most {SESSION_MAX_CHARS} characters")
            page, cursor, verdicts, mark = await anyio.to_thread.run_sync(
                lambda: self._cards_page(session, limit, query.get("cursor") or None, standing)
            )
        except (ValueError, StoreError) as exc:
            return _json({"error": str(exc)}, status=400)
        cards = [card(image, verdicts.get(image.image_id)) for image in page]
        return _json({"images": cards, "next_cursor": cursor, "verdict_mark": mark})

    async def verdict_changes(self, request: Request) -> Response:
        """{"changes": [{"id", "verdict", "verdict_reason", "verdict_at", "notes"}], "mark": int}: the images
        given a verdict after the mark `after` (from /events or /api/images), with their verdicts now, from at
        most MAX_LIST_LIMIT records; ask again from `mark` until it reaches the feed's mark. What it costs grows
        with the verdicts recorded, never with the cards on the page or in the store. A missing or bad `after`
        is a 400 with {"error": message}."""
        raw = request.query_params.get("after", "")
        after = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= len(str(MAX_MARK)) else -1
        if not 0 <= after <= MAX_MARK:
            message = f"after must be a verdict mark (a whole number from 0 to {MAX_MARK}, as /events sends)"
            return _json({"error": f"{message}, got {raw[:24]!r}"}, status=400)
        ids, verdicts, mark = await anyio.to_thread.run_sync(
            lambda: self.store.verdict_changes(after, limit=MAX_LIST_LIMIT)
        )
        changes = [{"id": i, **verdict_fields(verdicts.get(i))} for i in ids if i in verdicts]
        return _json({"changes": changes, "mark": mark})

    async def one_image(self, request: Request) -> Response:
        """One card, for an image the page has not loaded (a parent on a later page); 404 if unknown."""
        image = await self._get(request.path_params["image_id"])
        verdicts = await anyio.to_thread.run_sync(lambda: self.store.verdicts([image.image_id]))
        return _json(card(image, verdicts.get(image.image_id)))

    # ---- pictures ----------------------------------------------------------------------------------------

    async def png(self, request: Request) -> Response:
        """`<id>.png`: the stored PNG, inline or (`?download=1`) as an attachment named `<id>.png`."""
        image_id = _id_from(request.path_params["name"], ".png")
        if request.headers.get("if-none-match") == f'"{image_id}"':
            return Response(status_code=304, headers={"cache-control": IMMUTABLE, "etag": f'"{image_id}"'})
        try:
            data = await anyio.to_thread.run_sync(self.store.read_png, image_id)
        except UnknownImageError:
            raise HTTPException(404) from None
        disposition = "attachment" if request.query_params.get("download") else "inline"
        headers = {
            "cache-control": IMMUTABLE,
            "etag": f'"{image_id}"',
            "content-disposition": f'{disposition}; filename="{image_id}.png"',
        }
        return Response(data, media_type="image/png", headers=headers)

    async def thumb(self, request: Request) -> Response:
        """`<id>.webp`: the thumbnail, made on first request and cached on disk."""
        image_id = _id_from(request.path_params["name"], ".webp")
        etag = f'"{image_id}-{self.thumbs.edge}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"cache-control": IMMUTABLE, "etag": etag})
        image = await self._get(image_id)
        try:
            data = await anyio.to_thread.run_sync(self.thumbs.webp, image)
        except UnknownImageError:
            raise HTTPException(404) from None
        return Response(data, media_type="image/webp", headers={"cache-control": IMMUTABLE, "etag": etag})

    # ---- live --------------------------------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        """Server-sent events: `change` with {"newest": id | null, "total": n, "verdicts": mark} at once and
        whenever one of them changes (an image stored or evicted, a verdict recorded), checked every `poll_s`; a
        comment every 15 s keeps proxies open."""

        async def changes() -> AsyncIterator[dict[str, str]]:
            last = None
            # A catalog that pushes (PostgreSQL: LISTEN/NOTIFY) wakes this at the commit of a row made by any
            # front-end, and at the commit of a verdict; the others (SQLite) are polled. Deletes are not pushed:
            # the wait ends every FEED_WAIT_S.
            feed = await anyio.to_thread.run_sync(self.store.catalog.listen)
            try:
                while True:
                    now = await anyio.to_thread.run_sync(self._head)
                    if now != last:
                        last = now
                        data = {"newest": now[0], "total": now[1], "verdicts": now[2]}
                        yield {"event": "change", "data": json.dumps(data)}
                    if feed is None:
                        await anyio.sleep(self.poll_s)
                    else:
                        await anyio.to_thread.run_sync(feed.wait, FEED_WAIT_S)
            finally:
                if feed is not None:
                    feed.close()

        return EventSourceResponse(changes(), ping=15, headers={"cache-control": "no-store"})

    # ---- helpers -----------------------------------------------------------------------------------------

    def _cards_page(
        self, session: str | None, limit: int, cursor: str | None, standing: str | None
    ) -> tuple[list[StoredImage], str | None, dict[str, Verdicts], int]:
        """A page of images (of one standing verdict if given), their verdicts and the verdict mark read before
        them (so a verdict recorded meanwhile is in the changes after the mark), in one worker-thread call."""
        mark = self.store.verdict_mark()
        page, next_cursor = self.store.list_images(
            session=session, limit=limit, cursor=cursor, standing=standing
        )
        return page, next_cursor, self.store.verdicts([image.image_id for image in page]), mark

    def _head(self) -> tuple[str | None, int, int]:
        """The head check, three cheap reads: the newest image, the image count, the verdict mark."""
        page, _ = self.store.list_images(limit=1)
        return (page[0].image_id if page else None, self.store.stats().count, self.store.verdict_mark())

    async def _get(self, image_id: str) -> StoredImage:
        if not ImageStore.is_valid_id(image_id):
            raise HTTPException(404)
        try:
            return await anyio.to_thread.run_sync(self.store.get, image_id)
        except UnknownImageError:
            raise HTTPException(404) from None

    def _every_image(self) -> list[StoredImage]:
        found: list[StoredImage] = []
        cursor = None
        while True:
            page, cursor = self.store.list_images(limit=MAX_LIST_LIMIT, cursor=cursor)
            found += page
            if cursor is None:
                return found

    async def _error_page(self, request: Request, exc: Exception) -> Response:
        """404 (and 405: the gallery is read-only) as a page for people, or {"error": ...} under /api/."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = _ERRORS.get(status, "Something went wrong.")
        if "/api/" in request.url.path:
            return _json({"error": message}, status=status)
        body = self._error_template.replace(b"{{message}}", message.encode())
        return Response(body, status_code=status, media_type="text/html; charset=utf-8")


def _id_from(name: str, suffix: str) -> str:
    """The image id in a file name `<id><suffix>`, checked with the store's id rule; anything else is a 404."""
    image_id = name.removesuffix(suffix)
    if not name.endswith(suffix) or not ImageStore.is_valid_id(image_id):
        raise HTTPException(404)
    return image_id


def _json(payload: Any, *, status: int = 200) -> Response:
    return JSONResponse(payload, status_code=status, headers={"cache-control": "no-store"})


def _with_headers(app: ASGIApp) -> ASGIApp:
    """`app` with the security headers on every response: a strict content security policy (the page's own
    script and styles only, no inline code, no framing), no MIME sniffing, no referrer."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped
