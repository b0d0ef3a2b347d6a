"""Structured content of the tools: small JSON objects, never base64. They are also the tools' outputSchema.

Claude Code shows the model only the structured content when a result has some, so every model carries the
facts an agent needs (ids, seeds, sizes, parents).

Pydantic publishes a model's docstring as its schema's `description`, so a docstring here changes tools/list
(pinned by tests/snapshots/server_tools.json). The models without one are described by a comment instead.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


# One image in a generate, edit or compose result.
class ImageRef(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    image_id: str
    uri: str = Field(description="image://<image_id>: the full-resolution PNG as a resource")
    seed: int | None = Field(description="the seed that made it; null for imported pictures")
    width: int
    height: int
    parents: list[str] = Field(description="ids of the images it was made from, in 'image 1, image 2' order")


class ImagesResult(BaseModel):
    """What generate, edit and compose return."""

    images: list[ImageRef]
    elapsed_ms: int = Field(description="wall time of the whole call, including queueing and storing")
    model_ms: int = Field(description="time the model itself took; 0 when no model ran")
    steps: int | None = Field(description="denoising steps; null for pictures no model run made")
    session: str | None
    cache_hits: dict[str, int] = Field(
        description="what earlier calls saved this one: prompt embeddings (prompt), reference latents "
        "(references), klein 9B-KV's kept reference keys and values (reference_kv)"
    )
    notes: list[str] = Field(
        default_factory=list,
        description="what to know about how the call ran, e.g. an argument this model ignores; usually empty",
    )
    caption_source: str | None = Field(
        default=None,
        description="FLUX 3: the text the model encoded: upsampler (the server's prompt upsampler wrote it), "
        "caller (your caption, verbatim) or prompt (the prompt as given); the recipe keeps it. null for FLUX.2",
    )


# One stored image in a list_images page; `created_at` is a UTC ISO 8601 time.
class ListedImage(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    image_id: str
    tool: str = Field(description="generate, edit, compose, inpaint or import")
    width: int
    height: int
    seed: int | None
    prompt: str | None = Field(description="the prompt, cut to 120 characters")
    parents: list[str]
    session: str | None
    created_at: str
    recipe_unreadable: bool = Field(
        default=False, description="true when the stored recipe is damaged: tool, seed and prompt are unknown"
    )
    verdict: str | None = Field(default=None, description="standing: the latest pick or reject, or null")
    verdict_reason: str | None = Field(default=None, description="the reason given with that verdict")
    notes: list[str] = Field(default_factory=list, description="the newest notes on the image, newest first")


# What list_images returns: a page of stored images, newest first.
class ListResult(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    images: list[ListedImage]
    next_cursor: str | None = Field(
        description="pass as cursor to get the next (older) page; null at the end"
    )


# One image shown by view_image, at its full size in px.
class ViewedImage(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    image_id: str
    width: int
    height: int


# What view_image returns: the images shown and the preview's size (px) and format.
class ViewResult(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    images: list[ViewedImage]
    preview_width: int
    preview_height: int
    preview_mime_type: str


# What export_image returns: where the PNG was written and its size in bytes.
class ExportResult(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    image_id: str
    path: str = Field(description="absolute path of the written PNG on the server's machine")
    file_uri: str
    size_bytes: int


# server_status: the model's load state and, once loaded, what it is and where it runs.
# server_status: a LoRA adapter loaded with --lora, and the scale a call gets when it gives none.
class LoadedLora(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    name: str
    scale: float


class ModelStatus(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    state: str = Field(description="loading, ready, failed or stopped")
    error: str | None
    model: str | None
    variant: str | None
    device: str | None
    dtype: str | None
    default_steps: int | None
    max_references: int | None
    load_seconds: float | None
    loras: list[LoadedLora] = Field(
        default_factory=list, description="loaded LoRA adapters; image tools choose them by name (loras)"
    )


# server_status: the engine's queue and counters since start; `mean_model_ms` in ms.
class QueueStatus(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    running: bool
    queued: int
    max_queue: int
    completed: int
    failed: int
    cancelled: int
    mean_model_ms: float | None
    cache_hits: dict[str, int]


# server_status: the image store's folder, contents and bounds (bytes, images).
class StoreStatus(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    root: str
    images: int
    total_bytes: int
    max_bytes: int | None
    max_images: int | None


# What server_status returns; `max_pixels_per_call` counts width x height x num_images.
class StatusResult(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    model: ModelStatus
    queue: QueueStatus
    store: StoreStatus
    allowed_dirs: list[str]
    allow_urls: bool
    max_pixels_per_call: int | None = Field(
        description="width x height x num_images one call may ask for; null while it depends on the device of "
        "a model still loading (then 2048x2048 on CUDA, 1024x1024 on MPS, 512x512 on a CPU)"
    )
    version: str
    gallery_command: str  # the shell command that shows the store in a browser
