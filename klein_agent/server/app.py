"""`build_server`: one MCPServer with the klein-agent tools, resources and prompts, in a fixed order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mcp.server import MCPServer
from mcp_types import ToolAnnotations

from klein_agent import __version__
from klein_agent.server.prompts import register_prompts
from klein_agent.server.resources import register_resources
from klein_agent.server.state import ServerState
from klein_agent.server.tools.generation import GenerationTools
from klein_agent.server.tools.library import LibraryTools

INSTRUCTIONS = """\
Local FLUX.2 [klein] image tools for try -> critique -> retry loops. generate makes images from text, edit \
changes one image, compose combines up to 4 ("image 1", "image 2", ... in the prompt). Every image is stored and \
referenced by its id (img_...); results carry a preview, the ids and seeds, and image://<id> links \
(image://<id>/meta is the recipe). Describe what the picture should show, positively. If you cannot see a \
preview, call view_image. Calls run one at a time; server_status shows the model and the queue."""


def _store_text(state: ServerState) -> str:
    store = state.store
    return (
        f"Results are kept in a persistent store across restarts and referenced by id (img_...); beyond "
        f"{store.max_images} images or {store.max_bytes / 2**30:.1f} GiB the least recently used are removed."
    )


def _inputs_text(state: ServerState) -> str:
    urls = ", an http(s) URL" if state.policy.allow_urls else ""
    return (
        "Images are given as an id (img_... or image://<id>), an absolute PNG/JPEG/WebP path in a folder the "
        f"server may read{urls} or a data:image/...;base64 URI; paths and URIs are imported into the store first."
    )


def descriptions(state: ServerState) -> dict[str, str]:
    store = _store_text(state)
    look = "Returns a preview, the ids and seeds, and image:// links; if you cannot see the preview, call view_image."
    return {
        "generate": "Make 1-4 new images from a text prompt with the local FLUX.2 [klein] model. Put the subject "
        "first, then setting, style and light; describe what should be there, not what should not. Images get "
        f"seeds seed, seed+1, ...; the same seed and arguments reproduce an image. {look} {store}",
        "edit": 'Change one image by describing the result you want ("make the jacket bright yellow"), positively. '
        "Without width/height the output matches the input size (rounded to multiples of 16). Keep the seed to "
        f"change less between tries. {_inputs_text(state)} {look} {store}",
        "compose": 'Make an image from 1-4 reference images and a prompt that refers to them as "image 1", '
        '"image 2", ... in the order given (e.g. "the dog from image 1 on the beach from image 2"). Without '
        f"width/height the output matches image 1. {_inputs_text(state)} {look} {store}",
        "list_images": "List stored images, newest first, with their ids, sizes, seeds, prompts and parents "
        f"(lineage). Filter by session; page with cursor. {store}",
        "view_image": "Show stored images: one id gives a preview of that image, several ids one labelled contact "
        "sheet (labels 1, 2, ... follow the order given). max_edge picks the size, up to 1568 px. Use it to "
        "look closer, or when a tool result's preview is not visible to you.",
        "export_image": "Write the full-resolution PNG of a stored image to a path on the server's machine, inside "
        "a folder the server may write (the folders it may read images from). Refuses to overwrite unless "
        "overwrite is true.",
        "server_status": "Model (loading, ready or failed, with the error), device and dtype, queue depth, store "
        "size and bounds, and the folders the server may read and write.",
    }


def build_server(state: ServerState) -> MCPServer[ServerState]:
    """An MCPServer over `state`. Its lifespan starts loading the model in the background and returns at once,
    so `initialize` is answered while the weights load; the first image call waits for them."""

    @asynccontextmanager
    async def lifespan(server: MCPServer[ServerState]) -> AsyncIterator[ServerState]:
        state.engine.start()  # idempotent: several in-process clients may share one engine
        yield state

    mcp: MCPServer[ServerState] = MCPServer(
        "klein-agent",
        title="klein-agent",
        description="FLUX.2 [klein] image generation and editing for agents, with a persistent image store.",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
    )
    text = descriptions(state)
    make = GenerationTools(state)
    library = LibraryTools(state)
    reads_urls = state.policy.allow_urls
    writes = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False)
    reads = ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    )

    def annotate(base: ToolAnnotations, title: str, **changes: Any) -> ToolAnnotations:
        return base.model_copy(update={"title": title, **changes})

    tools: list[tuple[Any, str, ToolAnnotations]] = [
        (make.generate, "Generate images", annotate(writes, "Generate images", open_world_hint=False)),
        (make.edit, "Edit an image", annotate(writes, "Edit an image", open_world_hint=reads_urls)),
        (
            make.compose,
            "Compose from references",
            annotate(writes, "Compose from references", open_world_hint=reads_urls),
        ),
        (library.list_images, "List stored images", annotate(reads, "List stored images")),
        (library.view_image, "View stored images", annotate(reads, "View stored images")),
        (
            library.export_image,
            "Export an image as PNG",
            ToolAnnotations(
                title="Export an image as PNG",
                read_only_hint=False,
                destructive_hint=True,  # with overwrite=true it replaces a file
                idempotent_hint=True,
                open_world_hint=False,
            ),
        ),
        (library.server_status, "Server status", annotate(reads, "Server status")),
    ]
    for fn, title, hints in tools:
        mcp.add_tool(fn, name=fn.__name__, title=title, description=text[fn.__name__], annotations=hints)
    register_resources(mcp, state)
    register_prompts(mcp, state)
    return mcp
