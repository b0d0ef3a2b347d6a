"""The store tools: list_images, view_image, export_image, server_status. None of them runs the model."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent
from PIL import Image
from pydantic import Field

from klein_agent import __version__
from klein_agent.rules.limits import MIN_SIDE
from klein_agent.server.config import MAX_VIEW_IMAGES, VIEW_MAX_EDGE
from klein_agent.server.models import (
    ExportResult,
    ListedImage,
    ListResult,
    ModelStatus,
    QueueStatus,
    StatusResult,
    StoreStatus,
    ViewedImage,
    ViewResult,
)
from klein_agent.server.results import build_preview, image_block
from klein_agent.server.state import ServerState, check_session, now_iso, strip_image_uri, tool_errors
from klein_agent.service.exports import check_output_path
from klein_agent.service.store import StoredImage

ImageIdArg = Annotated[
    str, Field(min_length=1, max_length=200, description="An image id (img_...) or image://<id>.")
]
ImageIdsArg = Annotated[
    list[str] | str,
    Field(
        description=f"One image id, or a list of up to {MAX_VIEW_IMAGES} ids for a labelled contact sheet "
        "(labels 1, 2, ... follow this order)."
    ),
]
MaxEdgeArg = Annotated[
    int,
    Field(
        ge=MIN_SIDE,
        le=VIEW_MAX_EDGE,
        description="Long edge of the preview in px (never larger than the image).",
    ),
]
LimitArg = Annotated[int, Field(ge=1, le=100)]
SessionFilterArg = Annotated[
    str | None, Field(min_length=1, max_length=64, description="Only this session's images.")
]
CursorArg = Annotated[
    str | None, Field(max_length=300, description="next_cursor from the previous page; omit for the newest.")
]
PathArg = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        description="Absolute path of the .png to write, or of a folder (the file is then <image_id>.png). "
        "Must be inside a folder the server may write.",
    ),
]


def _excerpt(text: object, limit: int = 120) -> str | None:
    if not isinstance(text, str):
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _listed(image: StoredImage) -> ListedImage:
    recipe = image.recipe
    seed = recipe.get("seed")
    return ListedImage(
        image_id=image.image_id,
        tool=str(recipe.get("tool", "unknown")),
        width=image.width,
        height=image.height,
        seed=seed if isinstance(seed, int) else None,
        prompt=_excerpt(recipe.get("prompt")),
        parents=list(image.parents),
        session=image.session,
        created_at=now_iso(image.created_at),
    )


class LibraryTools:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def list_images(
        self,
        session: SessionFilterArg = None,
        limit: LimitArg = 20,
        cursor: CursorArg = None,
    ) -> Annotated[CallToolResult, ListResult]:
        session = check_session(session)
        with tool_errors():
            try:
                page, next_cursor = await anyio.to_thread.run_sync(
                    lambda: self.state.store.list(session=session, limit=limit, cursor=cursor)
                )
            except ValueError as exc:  # a malformed or foreign cursor; the store's message says what to pass
                raise ToolError(str(exc)) from exc
        listed = [_listed(img) for img in page]
        where = f' in session "{session}"' if session else ""
        if not listed:
            text = f"No images{where}" + (" on this page." if cursor else " yet: call generate to make one.")
        else:
            lines = [f"{len(listed)} image(s){where}, newest first:"]
            for item in listed:
                made = f"{item.tool}"
                if item.seed is not None:
                    made += f" seed {item.seed}"
                if item.parents:
                    made += " from " + ", ".join(item.parents)
                prompt = f' "{item.prompt}"' if item.prompt else ""
                lines.append(
                    f"- {item.image_id} {item.width}x{item.height} {made} ({item.created_at}){prompt}"
                )
            if next_cursor:
                lines.append(f"More: call list_images with cursor={next_cursor!r} (same session).")
            text = "\n".join(lines)
        result = ListResult(images=listed, next_cursor=next_cursor)
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json")
        )

    async def view_image(
        self, image_ids: ImageIdsArg, max_edge: MaxEdgeArg = 1024
    ) -> Annotated[CallToolResult, ViewResult]:
        ids = [image_ids] if isinstance(image_ids, str) else list(image_ids)
        if not ids:
            raise ToolError(
                "image_ids is empty: pass one image id, or a list of ids (list_images shows them)"
            )
        if len(ids) > MAX_VIEW_IMAGES:
            raise ToolError(f"{len(ids)} ids given; view_image shows at most {MAX_VIEW_IMAGES} at once")
        ids = [strip_image_uri(i) for i in ids]
        store = self.state.store

        def load() -> tuple[list[StoredImage], list[Image.Image]]:
            meta = [store.get(i) for i in ids]
            pictures = []
            for i in ids:
                with Image.open(io.BytesIO(store.read_png(i)), formats=["PNG"]) as im:
                    pictures.append(im.convert("RGB"))
            return meta, pictures

        with tool_errors():
            meta, pictures = await anyio.to_thread.run_sync(load)
        labels = [ids[0]] if len(ids) == 1 else [f"{k} {i}" for k, i in enumerate(ids, start=1)]
        preview = await anyio.to_thread.run_sync(
            lambda: build_preview(
                pictures, labels, max_edge=max_edge, budget_b64=self.state.config.preview_budget_b64
            )
        )
        if len(ids) == 1:
            text = f"{ids[0]}: {meta[0].width}x{meta[0].height}, shown at {preview.width}x{preview.height}."
        else:
            text = (
                f"Contact sheet of {len(ids)} images, labelled in this order: "
                + ", ".join(
                    f"{k} = {i} ({m.width}x{m.height})"
                    for k, (i, m) in enumerate(zip(ids, meta, strict=True), start=1)
                )
                + "."
            )
        result = ViewResult(
            images=[ViewedImage(image_id=m.image_id, width=m.width, height=m.height) for m in meta],
            preview_width=preview.width,
            preview_height=preview.height,
            preview_mime_type=preview.mime_type,
        )
        return CallToolResult(
            content=[image_block(preview), TextContent(type="text", text=text)],
            structured_content=result.model_dump(mode="json"),
        )

    async def export_image(
        self, image_id: ImageIdArg, path: PathArg, overwrite: bool = False
    ) -> Annotated[CallToolResult, ExportResult]:
        image_id = strip_image_uri(image_id)
        state = self.state

        def export() -> tuple[str, int]:
            png = state.store.read_png(image_id)
            target = check_output_path(path, state.policy, default_name=f"{image_id}.png")
            if target.exists() and not overwrite:
                raise ToolError(
                    f"{str(target)!r} already exists: pass overwrite=true to replace it, or choose another name"
                )
            _write_atomically(target, png)
            return str(target), len(png)

        with tool_errors():
            written, size = await anyio.to_thread.run_sync(export)
        uri = _file_uri(written)
        result = ExportResult(image_id=image_id, path=written, file_uri=uri, size_bytes=size)
        text = f"Wrote {image_id} as a full-resolution PNG ({size} bytes) to {written} ({uri})."
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json")
        )

    async def server_status(self) -> Annotated[CallToolResult, StatusResult]:
        state = self.state
        engine = state.engine.status()
        stats = await anyio.to_thread.run_sync(state.store.stats)
        info = engine.info
        result = StatusResult(
            model=ModelStatus(
                state=engine.state.value,
                error=engine.error,
                model=info.model if info else None,
                variant=info.variant if info else None,
                device=info.device if info else None,
                dtype=info.dtype if info else None,
                default_steps=info.default_steps if info else None,
                max_references=info.max_references if info else None,
                load_seconds=round(engine.load_seconds, 2) if engine.load_seconds is not None else None,
            ),
            queue=QueueStatus(
                running=engine.running,
                queued=engine.queue_depth,
                max_queue=engine.max_queue,
                completed=engine.completed,
                failed=engine.failed,
                cancelled=engine.cancelled,
                mean_model_ms=round(engine.mean_model_ms, 1) if engine.mean_model_ms is not None else None,
                cache_hits=engine.cache_hits,
            ),
            store=StoreStatus(
                root=str(stats.root),
                images=stats.count,
                total_bytes=stats.total_bytes,
                max_bytes=stats.max_bytes,
                max_images=stats.max_images,
            ),
            allowed_dirs=[str(d) for d in state.policy.allowed_dirs],
            allow_urls=state.policy.allow_urls,
            max_pixels_per_call=state.config.max_pixels_per_call,
            version=__version__,
        )
        model = result.model
        if model.state == "ready":
            head = f"Model {model.model} ({model.variant}) ready on {model.device}, {model.dtype}"
        elif model.state == "failed":
            head = f"Model failed to load: {model.error}"
        else:
            head = f"Model {model.state}"
        text = (
            f"{head}. Queue: {'1 running, ' if engine.running else ''}{engine.queue_depth} waiting "
            f"(max {engine.max_queue}); {engine.completed} calls done. "
            f"Store: {stats.count} images, {stats.total_bytes / 2**20:.1f} of {stats.max_bytes / 2**20:.0f} MiB, "
            f"at most {stats.max_images} images, in {stats.root}."
        )
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json")
        )


def _write_atomically(target: os.PathLike[str] | str, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over the target (a symlink planted meanwhile is replaced)."""
    folder = os.path.dirname(os.fspath(target))
    tmp = os.path.join(folder, f".klein-export-{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ToolError(
            f"could not write {os.fspath(target)!r}: {exc.strerror or exc}; check the folder"
        ) from exc


def _file_uri(path: str) -> str:
    return Path(path).as_uri()
