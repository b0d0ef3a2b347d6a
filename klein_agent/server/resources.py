"""Resource templates: `image://{image_id}` is the full-resolution PNG, `image://{image_id}/meta` its recipe."""

from __future__ import annotations

import json
from typing import Any

import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError

from klein_agent.rules.recipes import rerun_call
from klein_agent.server.results import image_uri
from klein_agent.service.store import StoredImage, UnknownImageError
from klein_agent.service.studio import Studio, now_iso


def meta_document(image: StoredImage) -> dict[str, Any]:
    """The JSON of `image://{image_id}/meta`: size, lineage, session, the recipe and the call that remakes it."""
    return {
        "image_id": image.image_id,
        "uri": image_uri(image.image_id),
        "width": image.width,
        "height": image.height,
        "size_bytes": image.size_bytes,
        "created_at": now_iso(image.created_at),
        "session": image.session,
        "parents": list(image.parents),
        "recipe": image.recipe,
        "rerun": rerun_call(image.recipe, image.parents),
    }


def register_resources(mcp: MCPServer[Any], studio: Studio) -> None:
    """Add `image://{image_id}` (the PNG) and `image://{image_id}/meta` (the recipe as JSON)."""
    store = studio.store

    @mcp.resource(
        "image://{image_id}",
        name="image",
        title="Stored image",
        description="The full-resolution PNG of a stored image (ids come from tool results or list_images). "
        "Over about 6 MiB it comes as lossless WebP (same pixels), or, when that is too large for one message, "
        "as an error: use export_image to get the file.",
        mime_type="image/png",
    )
    async def image_png(image_id: str) -> bytes:
        try:
            return await anyio.to_thread.run_sync(store.read_png, image_id)
        except UnknownImageError as exc:
            raise ResourceNotFoundError(str(exc)) from exc

    @mcp.resource(
        "image://{image_id}/meta",
        name="image-meta",
        title="How a stored image was made",
        description="JSON: size, parents, session, and the recipe (tool, prompt, seed, steps, guidance, model, "
        "timings); `rerun` is the tool call that makes the same picture again.",
        mime_type="application/json",
    )
    async def image_meta(image_id: str) -> str:
        try:
            image = await anyio.to_thread.run_sync(store.get, image_id)
        except UnknownImageError as exc:
            raise ResourceNotFoundError(str(exc)) from exc
        return json.dumps(meta_document(image), indent=2, ensure_ascii=False)
