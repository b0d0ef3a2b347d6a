"""The image-making tools: generate, edit, compose. Validate everything, import inputs, queue, store, preview."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult
from PIL import Image
from pydantic import Field

from klein_agent import __version__
from klein_agent.rules.limits import (
    MAX_GUIDANCE,
    MAX_IMAGES_PER_CALL,
    MAX_PROMPT_CHARS,
    MAX_REFERENCES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_SIDE,
    SIZE_MULTIPLE,
)
from klein_agent.rules.recipes import provenance
from klein_agent.rules.requests import GenerationRequest, GenerationResult
from klein_agent.server.models import ImagesResult
from klein_agent.server.results import build_preview, images_result, preview_labels
from klein_agent.server.state import (
    ServerState,
    check_session,
    clean_prompt,
    import_images,
    load_images,
    now_iso,
    plan_seeds,
    plan_size,
    tool_errors,
)
from klein_agent.service.engine import JobTimes
from klein_agent.service.inputs import LoadedImage
from klein_agent.service.previews import encode_png
from klein_agent.service.store import StoredImage

PromptArg = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What the picture shows, subject first. Say what should be there, not what should not.",
    ),
]
SideArg = Annotated[
    int | None,
    Field(
        ge=MIN_SIDE,
        le=MAX_SIDE,
        multiple_of=SIZE_MULTIPLE,
        description="Output size in px (multiple of 16). Omit both for 1024x1024; give one and the other matches.",
    ),
]
OptionalSideArg = Annotated[
    int | None,
    Field(
        ge=MIN_SIDE,
        le=MAX_SIDE,
        multiple_of=SIZE_MULTIPLE,
        description="Output size in px (multiple of 16). Omit both to take image 1's size as the model sees it "
        "(at most ~1 megapixel); give one and the other keeps image 1's aspect ratio.",
    ),
]
SeedArg = Annotated[
    int | None,
    Field(
        ge=0,
        le=MAX_SEED,
        description="Omit for a random seed. The same seed and arguments give the same image.",
    ),
]
StepsArg = Annotated[
    int | None,
    Field(
        ge=1,
        le=MAX_STEPS,
        description="Denoising steps. Omit for the model's default (4 for distilled klein, 50 for Base).",
    ),
]
GuidanceArg = Annotated[
    float | None,
    Field(
        ge=MIN_GUIDANCE,
        le=MAX_GUIDANCE,
        description="Guidance scale for Base models (1 = off); distilled klein takes none.",
    ),
]
NumImagesArg = Annotated[
    int,
    Field(ge=1, le=MAX_IMAGES_PER_CALL, description="Variants to make, with seeds seed, seed+1, ..."),
]
SessionArg = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=64,
        description="A label that groups related images, e.g. 'logo-v2'; list_images can filter by it.",
    ),
]
ImageArg = Annotated[
    str,
    Field(
        min_length=1,
        description="An image id (img_...) or image://<id>, an absolute path to a PNG/JPEG/WebP file in a folder "
        "the server may read, or a data:image/png;base64,... URI.",
    ),
]
ImagesArg = Annotated[
    list[str],
    Field(
        min_length=1,
        max_length=MAX_REFERENCES,
        description='Reference images in order; the prompt calls them "image 1", "image 2", ... Each is an id, '
        "image://<id>, an absolute path in an allowed folder, or a data: URI.",
    ),
]


@dataclass(frozen=True)
class _Batch:
    stored: list[StoredImage]
    seeds: list[int]
    pictures: list[Image.Image]
    steps: int
    model_ms: float
    cache_hits: dict[str, int]


class GenerationTools:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def generate(
        self,
        ctx: Context,
        prompt: PromptArg,
        width: SideArg = None,
        height: SideArg = None,
        seed: SeedArg = None,
        steps: StepsArg = None,
        guidance: GuidanceArg = None,
        num_images: NumImagesArg = 1,
        session: SessionArg = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        text = clean_prompt(prompt)
        session = check_session(session)
        plan_size(self.state, None, width, height, num_images)
        seeds = plan_seeds(seed, num_images)
        return await self._make(
            ctx, "generate", text, width, height, seeds[0], steps, guidance, num_images, session, []
        )

    async def edit(
        self,
        ctx: Context,
        image: ImageArg,
        prompt: PromptArg,
        width: OptionalSideArg = None,
        height: OptionalSideArg = None,
        seed: SeedArg = None,
        steps: StepsArg = None,
        guidance: GuidanceArg = None,
        num_images: NumImagesArg = 1,
        session: SessionArg = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        text = clean_prompt(prompt)
        session = check_session(session)
        self._check_reference_count(1)
        seeds = plan_seeds(seed, num_images)
        loaded = await load_images(self.state, [image])
        plan_size(self.state, loaded[0].image, width, height, num_images)
        return await self._make(
            ctx, "edit", text, width, height, seeds[0], steps, guidance, num_images, session, loaded
        )

    async def compose(
        self,
        ctx: Context,
        images: ImagesArg,
        prompt: PromptArg,
        width: OptionalSideArg = None,
        height: OptionalSideArg = None,
        seed: SeedArg = None,
        steps: StepsArg = None,
        guidance: GuidanceArg = None,
        num_images: NumImagesArg = 1,
        session: SessionArg = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        text = clean_prompt(prompt)
        session = check_session(session)
        self._check_reference_count(len(images))
        seeds = plan_seeds(seed, num_images)
        loaded = await load_images(self.state, images)
        plan_size(self.state, loaded[0].image, width, height, num_images)
        return await self._make(
            ctx, "compose", text, width, height, seeds[0], steps, guidance, num_images, session, loaded
        )

    # -- shared ----------------------------------------------------------------------------------------------

    def _check_reference_count(self, n: int) -> None:
        info = self.state.engine.info
        limit = min(MAX_REFERENCES, info.max_references) if info is not None else MAX_REFERENCES
        if n > limit:
            raise ToolError(
                f"{n} reference images given, but this model takes at most {limit}: pass fewer images, "
                "or compose in two rounds (combine some first, then use that result as one reference)"
            )

    async def _make(
        self,
        ctx: Context,
        tool: str,
        prompt: str,
        width: int | None,
        height: int | None,
        seed: int,
        steps: int | None,
        guidance: float | None,
        num_images: int,
        session: str | None,
        loaded: list[LoadedImage],
    ) -> CallToolResult:
        t0 = time.perf_counter()
        state = self.state
        parents = await import_images(state, loaded, session)
        request = GenerationRequest(
            prompt=prompt,
            width=width,
            height=height,
            seed=seed,
            num_images=num_images,
            steps=steps,
            guidance=guidance,
            references=tuple(item.image for item in loaded),
        )

        async def progress(value: float, total: float | None, message: str) -> None:
            await ctx.report_progress(value, total, message)

        def finish(result: GenerationResult, times: JobTimes) -> _Batch:
            return self._store(tool, request, parents, session, result, times)

        with tool_errors(), state.store.pinned(parents):
            batch = await state.engine.run(request, finish, progress=progress)
        labels = preview_labels(batch.stored, batch.seeds)
        preview = await anyio.to_thread.run_sync(
            lambda: build_preview(
                batch.pictures,
                labels,
                max_edge=state.config.preview_max_edge,
                budget_b64=state.config.preview_budget_b64,
            )
        )
        return images_result(
            tool=tool,
            stored=batch.stored,
            seeds=batch.seeds,
            parents=parents,
            preview=preview,
            elapsed_ms=(time.perf_counter() - t0) * 1000,
            model_ms=batch.model_ms,
            steps=batch.steps,
            session=session,
            cache_hits=batch.cache_hits,
        )

    def _store(
        self,
        tool: str,
        request: GenerationRequest,
        parents: list[str],
        session: str | None,
        result: GenerationResult,
        times: JobTimes,
    ) -> _Batch:
        """On the engine's worker, right after the model: one PNG and one store record per image."""
        stored: list[StoredImage] = []
        seeds = list(result.resolved.seeds)
        for k, picture in enumerate(result.images):
            # What decides the pixels; written into the PNG too, so it must be the same on every re-run.
            recipe_core = provenance(result, k, tool=tool, parents=parents)
            recipe = {
                **recipe_core,
                "session": session,
                "batch": {"index": k, "of": len(result.images), "first_seed": seeds[0]},
                "device": result.info.device,
                "dtype": result.info.dtype,
                "timings_ms": {key: round(value, 1) for key, value in result.timings_ms.items()},
                "queued_ms": round(times.queued_ms, 1),
                "model_ms": round(times.model_ms, 1),
                "cache_hits": dict(result.cache_hits),
                "created_at": now_iso(),
                "klein_agent": __version__,
            }
            png = encode_png(picture, provenance=recipe_core)
            stored.append(
                self.state.store.put(
                    png,
                    width=picture.width,
                    height=picture.height,
                    recipe=recipe,
                    parents=parents,
                    session=session,
                )
            )
        steps = result.resolved.steps
        return _Batch(
            stored=stored,
            seeds=seeds,
            pictures=list(result.images),
            steps=steps,
            model_ms=times.model_ms,
            cache_hits=dict(result.cache_hits),
        )
