"""The store tools: list_images, view_image, export_image and server_status, each with its description and
annotations beside it. None of them runs the model; each is a thin layer over `Studio`."""

from __future__ import annotations

from typing import Annotated

from mcp.server import MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from klein_agent.gallery.command import command_line
from klein_agent.option_types import store_locations
from klein_agent.rules.image_refs import split_image_refs
from klein_agent.rules.limits import (
    MAX_CURSOR_CHARS,
    MAX_LIST_LIMIT,
    MAX_VIEW_IMAGES,
    MIN_SIDE,
    SESSION_MAX_CHARS,
    VIEW_MAX_EDGE,
)
from klein_agent.rules.masks import box_from_values
from klein_agent.server.apps import MODEL_ONLY_META, VIEW_META
from klein_agent.server.errors import tool_errors
from klein_agent.server.models import (
    ExportResult,
    ListedImage,
    ListResult,
    LoadedLora,
    ModelStatus,
    QueueStatus,
    StatusResult,
    StoreStatus,
    ViewedImage,
    ViewResult,
)
from klein_agent.server.results import image_block
from klein_agent.server.texts import store_note
from klein_agent.service.critique.critic import Critic
from klein_agent.service.critique.zoom import region_rectangle
from klein_agent.service.store import UNREADABLE_RECIPE, StoredImage, Verdicts
from klein_agent.service.studio import Studio, now_iso

ImageIdArg = Annotated[
    str, Field(min_length=1, max_length=200, description="An image id (img_...) or image://<id>.")
]
ImageIdsArg = Annotated[
    list[str] | str,
    Field(
        description=f"One image id, or a list of up to {MAX_VIEW_IMAGES} ids for a labelled contact sheet "
        '(labels 1, 2, ... follow this order); "id1, id2" in one string is read as that list.'
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
RegionArg = Annotated[
    list[float] | None,
    Field(
        description="Zoom: only this part of the image, [x, y, width, height] in px, or fractions when all four "
        "are at most 1 (as inpaint's boxes and compare_images' regions), shown at full resolution (small regions "
        "enlarged by a whole factor, pixels kept sharp), up to max_edge. With several ids, the same region of "
        "each."
    ),
]
StandingArg = Annotated[
    str | None,
    Field(
        max_length=16,
        description='"pick" or "reject": only the images whose standing verdict (record_verdict) is this.',
    ),
]
LimitArg = Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT)]
SessionFilterArg = Annotated[
    str | None, Field(min_length=1, max_length=SESSION_MAX_CHARS, description="Only this session's images.")
]
CursorArg = Annotated[
    str | None,
    Field(
        max_length=MAX_CURSOR_CHARS, description="next_cursor from the previous page; omit for the newest."
    ),
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


def read_only(title: str) -> ToolAnnotations:
    """The annotations of a tool that only reads the store."""
    return ToolAnnotations(
        title=title, read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    )


def register(mcp: MCPServer, studio: Studio, gallery_command: str | None = None) -> None:
    """Add list_images, view_image, export_image and server_status to `mcp`, in that order."""
    critic = Critic(studio.store)  # list_images shows verdicts and filters by them

    @mcp.tool(
        name="list_images",
        title="List stored images",
        description="List stored images, newest first, with their ids, sizes, seeds, prompts, parents "
        "(lineage) and verdicts (pick or reject, with the reason, and notes; record_verdict records them). "
        f'Filter by session or standing (standing="pick" lists the picks); page with cursor. '
        f"{store_note(studio)}",
        annotations=read_only("List stored images"),
    )
    async def list_images(
        session: SessionFilterArg = None,
        limit: LimitArg = 20,
        cursor: CursorArg = None,
        standing: StandingArg = None,
    ) -> Annotated[CallToolResult, ListResult]:
        with tool_errors():
            page, next_cursor, verdicts = await critic.list_images(session, limit, cursor, standing)
        listed = [_listed(img, verdicts.get(img.image_id)) for img in page]
        where = f' in session "{session}"' if session else ""
        where += f" with standing {standing}" if standing else ""
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
                if item.recipe_unreadable:
                    prompt += " (recipe unreadable: the stored record is damaged)"
                if item.verdict:
                    prompt += f"; {item.verdict.upper()}" + (
                        f": {item.verdict_reason}" if item.verdict_reason else ""
                    )
                prompt += "".join(f'; note: "{note}"' for note in item.notes)
                lines.append(
                    f"- {item.image_id} {item.width}x{item.height} {made} ({item.created_at}){prompt}"
                )
            if next_cursor:
                lines.append(
                    f"More: call list_images with cursor={next_cursor!r} (same session and standing)."
                )
            text = "\n".join(lines)
        result = ListResult(images=listed, next_cursor=next_cursor)
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json")
        )

    @mcp.tool(
        name="view_image",
        meta=VIEW_META,  # hosts with MCP Apps show the result in the view; others never see it
        title="View stored images",
        description="Show stored images: one id gives a preview of that image, several ids one labelled contact "
        "sheet (labels 1, 2, ... follow the order given). max_edge picks the size, up to 1568 px. region zooms "
        "in: that part at full resolution, to check a face, a hand or a line of text at 1:1 before judging "
        "detail. Use it to look closer, or when a tool result's preview is not visible to you.",
        annotations=read_only("View stored images"),
    )
    async def view_image(
        image_ids: ImageIdsArg, max_edge: MaxEdgeArg = 1024, region: RegionArg = None
    ) -> Annotated[CallToolResult, ViewResult]:
        with tool_errors():
            # Ids hold no commas or spaces, so a string of several ("img_a, img_b") can only mean the list.
            ids = split_image_refs(image_ids) if isinstance(image_ids, str) else list(image_ids)
            box = None if region is None else box_from_values(region, name="region")
            sheet = await studio.contact_sheet(ids, max_edge=max_edge, region=box)
        preview, meta = sheet.preview, sheet.images
        if box is not None:
            parts = []
            for m in meta:
                x, y, w, h = region_rectangle(box, (m.width, m.height))
                parts.append(f"{m.image_id}: region [{x}, {y}, {w}, {h}] px of {m.width}x{m.height}")
            # one region: say its scale (1:1, or the whole factor a small one was enlarged by); a sheet has labels
            scale = preview.width / region_rectangle(box, (meta[0].width, meta[0].height))[2]
            shown = ("1:1" if scale == 1 else f"{scale:.3g}x") if len(meta) == 1 else "as a labelled sheet"
            text = "; ".join(parts) + f", shown at {preview.width}x{preview.height} ({shown})."
        elif len(meta) == 1:
            text = f"{meta[0].image_id}: {meta[0].width}x{meta[0].height}, shown at {preview.width}x{preview.height}."
        else:
            text = (
                f"Contact sheet of {len(meta)} images, labelled in this order: "
                + ", ".join(f"{k} = {m.image_id} ({m.width}x{m.height})" for k, m in enumerate(meta, start=1))
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

    @mcp.tool(
        name="export_image",
        meta=MODEL_ONLY_META,  # hosts with MCP Apps keep it from the view; others never see it
        title="Export an image as PNG",
        description="Write the full-resolution PNG of a stored image to a path on the server's machine, inside "
        "a folder the server may write (the folders it may read images from). Refuses to overwrite unless "
        "overwrite is true.",
        annotations=ToolAnnotations(
            title="Export an image as PNG",
            read_only_hint=False,
            destructive_hint=True,  # with overwrite=true it replaces a file
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    async def export_image(
        image_id: ImageIdArg, path: PathArg, overwrite: bool = False
    ) -> Annotated[CallToolResult, ExportResult]:
        with tool_errors():
            exported = await studio.export(image_id, path, overwrite=overwrite)
        written = str(exported.path)
        uri = exported.path.as_uri()
        result = ExportResult(
            image_id=exported.image_id, path=written, file_uri=uri, size_bytes=exported.size_bytes
        )
        text = f"Wrote {exported.image_id} as a full-resolution PNG ({exported.size_bytes} bytes) to {written} ({uri})."
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json")
        )

    @mcp.tool(
        name="server_status",
        title="Server status",
        description="Model (loading, ready or failed, with the error), device and dtype, queue depth, store "
        "size and bounds, the folders the server may read and write, and the command that shows the person the "
        "store's images and their lineage in a browser (gallery_command).",
        annotations=read_only("Server status"),
    )
    async def server_status() -> Annotated[CallToolResult, StatusResult]:
        status = await studio.status()
        engine, stats, info = status.engine, status.store, status.engine.info
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
                loras=[LoadedLora(name=n, scale=s) for n, s in info.loras] if info else [],
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
            allowed_dirs=[str(d) for d in status.allowed_dirs],
            allow_urls=status.allow_urls,
            max_pixels_per_call=status.max_pixels_per_call,
            version=status.version,
            # serve passes the command for the store as it was opened (a shared store's options); else the folder
            gallery_command=gallery_command or command_line(store_locations(stats.root)),
        )
        model = result.model
        if model.state == "ready":
            head = f"Model {model.model} ({model.variant}) ready on {model.device}, {model.dtype}"
            if model.loras:
                listed = ", ".join(f"{lora.name} (scale {lora.scale:g})" for lora in model.loras)
                head += f"; LoRA adapters, chosen per call with loras=[{{name, scale}}]: {listed}"
        elif model.state == "failed":
            head = f"Model failed to load: {(model.error or 'unknown error').rstrip('. ')}"
        else:
            head = f"Model {model.state}"
        # a generator that takes several calls at once (Ray replicas) says how many; the embedded text is as ever
        slots = f" of {engine.max_in_flight}" if engine.max_in_flight > 1 else ""
        running = f"{engine.running_calls}{slots} running, " if engine.running else ""
        text = (
            f"{head}. Queue: {running}{engine.queue_depth} waiting "
            f"(max {engine.max_queue}); {engine.completed} calls done. "
            f"Store: {stats.count} images, {stats.total_bytes / 2**20:.1f} of {stats.max_bytes / 2**20:.0f} MiB, "
            f"at most {stats.max_images} images, in {stats.root}. "
            f"To show the person every image, its recipe and lineage in a browser: `{result.gallery_command}` "
            "(a read-only page; `serve --http` also serves it at /gallery/)."
        )
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json")
        )


def _excerpt(text: object, limit: int = 120) -> str | None:
    if not isinstance(text, str):
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _listed(image: StoredImage, verdicts: Verdicts | None = None) -> ListedImage:
    """One list_images entry: what made the image, from its recipe, and its verdicts."""
    recipe = image.recipe
    seed = recipe.get("seed")
    standing = verdicts.standing if verdicts else None
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
        recipe_unreadable=UNREADABLE_RECIPE in recipe,
        verdict=standing.verdict if standing else None,
        verdict_reason=standing.reason if standing else None,
        notes=[note.reason for note in verdicts.notes] if verdicts else [],
    )
