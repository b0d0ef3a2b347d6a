"""The image-making tools: generate, edit, compose and inpaint, each with its description and annotations beside it.

A thin layer over `Studio.make`: each tool turns its typed arguments (their ranges are the input schema) into its
call value (`klein_agent.rules.calls`) and hands it to `run_call`, which adds the client's progress and returns the
result as a preview, a summary, links and structured content (`klein_agent.server.results`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from klein_agent.rules import families
from klein_agent.rules.calls import (
    IDEMPOTENCY_META_KEY,
    Compose,
    Edit,
    Generate,
    ImageCall,
    Inpaint,
    check_call_id,
)
from klein_agent.rules.limits import (
    DEFAULT_STRENGTH,
    DEFAULT_TOKENS_PER_SIDE,
    MAX_BOXES,
    MAX_CAPTION_CHARS,
    MAX_GUIDANCE,
    MAX_IMAGES_PER_CALL,
    MAX_LAYOUT_BOXES,
    MAX_LAYOUT_LABEL_CHARS,
    MAX_PROMPT_CHARS,
    MAX_REFERENCES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_SIDE,
    MOST_REFERENCES,
    SESSION_MAX_CHARS,
    SIZE_MULTIPLE,
    STEP_CACHE_KINDS,
    STEP_CACHE_MAX_THRESHOLD,
)
from klein_agent.rules.loras import MAX_LORA_SCALE
from klein_agent.rules.step_caches import DESCRIPTION as STEP_CACHE_DESCRIPTION
from klein_agent.rules.step_caches import THRESHOLD_TEXT
from klein_agent.server.apps import VIEW_META
from klein_agent.server.arguments import id_list
from klein_agent.server.errors import tool_errors
from klein_agent.server.models import ImagesResult
from klein_agent.server.results import images_result
from klein_agent.server.texts import inputs_note, store_note
from klein_agent.service.studio import Studio

PromptArg = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What the picture shows, subject first. Say what should be there, not what should not.",
    ),
]
CaptionArg = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=MAX_CAPTION_CHARS,
        description="FLUX 3 models only: the full caption the model encodes, used verbatim instead of the prompt "
        "(which the recipe still records). FLUX 3 was trained on long upsampled captions: write one with the "
        "flux3_caption prompt's instructions. Omit to let the server's upsampler write it, or to use the prompt.",
    ),
]
# the one line the FLUX 3 tools carry about captions (the rest is in CaptionArg and the flux3_caption prompt)
CAPTION_NOTE = "On a FLUX 3 model, pass a caption written with the flux3_caption prompt (the result says which text ran)."
_DEFAULT_SIDE = DEFAULT_TOKENS_PER_SIDE * SIZE_MULTIPLE
SideArg = Annotated[
    int | None,
    Field(
        ge=MIN_SIDE,
        le=MAX_SIDE,
        multiple_of=SIZE_MULTIPLE,
        description=f"Output size in px (multiple of {SIZE_MULTIPLE}). Omit both for {_DEFAULT_SIDE}x{_DEFAULT_SIDE}, "
        "or the largest square the server's per-call pixel budget allows (server_status: max_pixels_per_call); "
        "give one and the other matches.",
    ),
]
OptionalSideArg = Annotated[
    int | None,
    Field(
        ge=MIN_SIDE,
        le=MAX_SIDE,
        multiple_of=SIZE_MULTIPLE,
        description=f"Output size in px (multiple of {SIZE_MULTIPLE}). Omit both to take image 1's size as the model sees it "
        "(at most ~1 megapixel, less if the server's per-call pixel budget is smaller); give one and the other keeps "
        "image 1's aspect ratio.",
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
        description=f"Denoising steps. Omit for the model's default ({families.defaults_text()}).",
    ),
]
GuidanceArg = Annotated[
    float | None,
    Field(
        ge=MIN_GUIDANCE,
        le=MAX_GUIDANCE,
        description="Guidance scale for Base models (1 = off; defaults under steps); distilled models take none.",
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
        max_length=SESSION_MAX_CHARS,
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
    # the most any family takes: the loaded model's own limit is checked per call (rules.families)
    Annotated[list[str], Field(min_length=1, max_length=MOST_REFERENCES)] | str,
    Field(
        description='Reference images in order; the prompt calls them "image 1", "image 2", ... Each is an id, '
        'image://<id>, an absolute path in an allowed folder, or a data: URI. A list; "id1, id2" in one string is '
        "read as a list of ids (paths and data: URIs may hold commas and spaces, so pass those as a list).",
    ),
]


ReferencesArg = Annotated[
    list[str],
    Field(
        max_length=MAX_REFERENCES - 1,
        description='Optional images that guide what is painted in the region ("image 2", "image 3", ... in the '
        "prompt; the image being repainted is image 1). Each is an id, image://<id>, an allowed path or a data: URI.",
    ),
]
MaskArg = Annotated[
    str | None,
    Field(
        min_length=1,
        description="A mask picture: white repaints, black keeps (grey is cut at half). Any size with the image's "
        "aspect ratio. An id, image://<id>, an allowed path or a data: URI. Give a mask or boxes.",
    ),
]
BoxesArg = Annotated[
    list[Annotated[list[float], Field(min_length=4, max_length=4)]] | None,
    Field(
        min_length=1,
        max_length=MAX_BOXES,
        description="Regions to repaint, each [x, y, width, height] from the top-left corner: in pixels of the "
        "image, or all four at most 1 for fractions of it (e.g. [0.5, 0, 0.5, 0.5] is the top-right quarter). "
        "Easier than a mask; give boxes or a mask.",
    ),
]
StrengthArg = Annotated[
    float | None,
    Field(
        gt=0,
        le=1,
        description=f"How much of the region to change: 1 repaints it from scratch, lower keeps more of its "
        f"shapes and colours. Default {DEFAULT_STRENGTH}.",
    ),
]


class LoraChoice(BaseModel):
    """One LoRA adapter to run: its name as server_status lists it, and its scale."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key ("weight") must not be dropped silently

    name: str = Field(
        min_length=1, max_length=64, description="The adapter's name, as server_status lists it."
    )
    scale: float | None = Field(
        default=None,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        description="How strongly it applies: 1 as trained, 0 off, negative pushes away. Omit for the server's "
        "default for it.",
    )


LorasArg = Annotated[
    list[LoraChoice] | None,
    Field(
        max_length=8,
        description="LoRA adapters (styles, subjects) to apply, from those server_status lists; omit for none.",
    ),
]


class LayoutBox(BaseModel):
    """One box of a FLUX 3 layout: where an object goes, and what it is."""

    model_config = ConfigDict(extra="forbid")

    box: list[float] = Field(
        min_length=4,
        max_length=4,
        description="[y_min, x_min, y_max, x_max] in fractions of the picture (0-1), top-left origin, y first "
        "(as diffusers takes them): [0.1, 0.05, 0.9, 0.45] is a tall box on the left.",
    )
    label: str = Field(
        min_length=1, max_length=MAX_LAYOUT_LABEL_CHARS, description='What goes there ("a red umbrella").'
    )


LayoutArg = Annotated[
    list[LayoutBox] | None,
    Field(
        min_length=1,
        max_length=MAX_LAYOUT_BOXES,
        description="FLUX 3 models only: boxes placing objects. They go into the caption's box table, as BFL "
        "trained the model: the server's upsampler writes the caption around them, or, with `caption`, they are "
        "put back into yours (the flux3_caption prompt with `layout` teaches the table).",
    ),
]


def layout_values(layout: list[LayoutBox] | None) -> list[dict[str, object]]:
    """The layout argument as the call takes it ({"box", "label"} each; checked by the call)."""
    return [choice.model_dump() for choice in layout or []]


class StepCacheChoice(BaseModel):
    """A step cache for this call: its kind and threshold."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(json_schema_extra={"enum": list(STEP_CACHE_KINDS)}, description="The cache's rule.")
    threshold: float | None = Field(
        default=None,
        gt=0,
        le=STEP_CACHE_MAX_THRESHOLD,
        description=f"The error it accepts: {THRESHOLD_TEXT}.",
    )


CacheArg = Annotated[StepCacheChoice | None, Field(description=STEP_CACHE_DESCRIPTION)]


RETURNS_NOTE = "Returns a preview, the ids and seeds, and image:// links; if you cannot see the preview, call view_image."


def register(mcp: MCPServer, studio: Studio) -> None:
    """Add generate, edit, compose and inpaint to `mcp`, in that order."""
    store, inputs = store_note(studio), inputs_note(studio)
    urls = studio.policy.allow_urls
    family = families.family(studio.config.family)
    # FLUX 3 keeps a single input whole on a canvas of up to 4 Mpx and crops the picture back to it
    edit_size = (
        "at most ~1 megapixel"
        if family.name == families.FLUX2.name
        else "at most ~4 megapixels, less if the server's per-call pixel budget is smaller"
    )
    inpaint_note = (
        ""
        if family.no_masked_edits is None
        else f"Refused on this server: {family.no_masked_edits} have no masked-edit pipeline; use edit. "
    )

    @mcp.tool(
        name="generate",
        meta=VIEW_META,  # hosts with MCP Apps show the result in the view; others never see it
        title="Generate images",
        description=f"Make 1-4 new images from a text prompt with the local {family.title} model. Put the subject "
        "first, then setting, style and light; describe what should be there, not what should not. Images get "
        f"seeds seed, seed+1, ...; the same seed and arguments reproduce an image. {CAPTION_NOTE} {RETURNS_NOTE} "
        f"{store}",
        annotations=ToolAnnotations(
            title="Generate images",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=False,
        ),
    )
    async def generate(
        ctx: Context,
        prompt: PromptArg,
        caption: CaptionArg = None,
        layout: LayoutArg = None,
        width: SideArg = None,
        height: SideArg = None,
        seed: SeedArg = None,
        steps: StepsArg = None,
        guidance: GuidanceArg = None,
        num_images: NumImagesArg = 1,
        session: SessionArg = None,
        loras: LorasArg = None,
        cache: CacheArg = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        call = Generate(
            width=width,
            height=height,
            prompt=prompt,
            caption=caption,
            layout=layout_values(layout),
            seed=seed,
            steps=steps,
            guidance=guidance,
            num_images=num_images,
            session=session,
            loras=lora_pairs(loras),
            step_cache=step_cache_pair(cache),
        )
        return await run_call(studio, ctx, call)

    @mcp.tool(
        name="edit",
        meta=VIEW_META,  # hosts with MCP Apps show the result in the view; others never see it
        title="Edit an image",
        description='Change one image by describing the result you want ("make the jacket bright yellow"), '
        "positively. Without width/height the output takes the input's size as the model sees it "
        f"({edit_size}). Keep the seed to change less between tries. {CAPTION_NOTE} {inputs} {RETURNS_NOTE} "
        f"{store}",
        annotations=ToolAnnotations(
            title="Edit an image",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=urls,
        ),
    )
    async def edit(
        ctx: Context,
        image: ImageArg,
        prompt: PromptArg,
        caption: CaptionArg = None,
        layout: LayoutArg = None,
        width: OptionalSideArg = None,
        height: OptionalSideArg = None,
        seed: SeedArg = None,
        steps: StepsArg = None,
        guidance: GuidanceArg = None,
        num_images: NumImagesArg = 1,
        session: SessionArg = None,
        loras: LorasArg = None,
        cache: CacheArg = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        call = Edit(
            image=image,
            width=width,
            height=height,
            prompt=prompt,
            caption=caption,
            layout=layout_values(layout),
            seed=seed,
            steps=steps,
            guidance=guidance,
            num_images=num_images,
            session=session,
            loras=lora_pairs(loras),
            step_cache=step_cache_pair(cache),
        )
        return await run_call(studio, ctx, call)

    @mcp.tool(
        name="compose",
        meta=VIEW_META,  # hosts with MCP Apps show the result in the view; others never see it
        title="Compose from references",
        description=f"Make an image from 1-{family.max_references} reference images and a prompt that refers to "
        'them as "image 1", "image 2", ... in the order given (e.g. "the dog from image 1 on the beach from '
        "image 2\"). Without width/height the output takes image 1's size as the model sees it. "
        f"{CAPTION_NOTE} {inputs} {RETURNS_NOTE} {store}",
        annotations=ToolAnnotations(
            title="Compose from references",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=urls,
        ),
    )
    async def compose(
        ctx: Context,
        images: ImagesArg,
        prompt: PromptArg,
        caption: CaptionArg = None,
        layout: LayoutArg = None,
        width: OptionalSideArg = None,
        height: OptionalSideArg = None,
        seed: SeedArg = None,
        steps: StepsArg = None,
        guidance: GuidanceArg = None,
        num_images: NumImagesArg = 1,
        session: SessionArg = None,
        loras: LorasArg = None,
        cache: CacheArg = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        call = Compose(
            images=reference_list(images),
            width=width,
            height=height,
            prompt=prompt,
            caption=caption,
            layout=layout_values(layout),
            seed=seed,
            steps=steps,
            guidance=guidance,
            num_images=num_images,
            session=session,
            loras=lora_pairs(loras),
            step_cache=step_cache_pair(cache),
        )
        return await run_call(studio, ctx, call)

    @mcp.tool(
        name="inpaint",
        meta=VIEW_META,  # hosts with MCP Apps show the result in the view; others never see it
        title="Repaint a region",
        description=f"{inpaint_note}Repaint only part of an image and keep the rest: name the region with boxes ([x, y, width, "
        "height] in pixels or fractions) or a mask picture (white repaints), and describe what the region should "
        "show. Use it when one detail is wrong. The output keeps the image's size as the model sees it (at most "
        f"~1 megapixel, whole {SIZE_MULTIPLE} px tokens); the model repaints in {SIZE_MULTIPLE} px tokens. "
        f"{inputs} {RETURNS_NOTE} {store}",
        annotations=ToolAnnotations(
            title="Repaint a region",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=urls,
        ),
    )
    async def inpaint(
        ctx: Context,
        image: ImageArg,
        prompt: PromptArg,
        mask: MaskArg = None,
        boxes: BoxesArg = None,
        strength: StrengthArg = None,
        references: ReferencesArg | None = None,
        seed: SeedArg = None,
        steps: StepsArg = None,
        guidance: GuidanceArg = None,
        num_images: NumImagesArg = 1,
        session: SessionArg = None,
        loras: LorasArg = None,
        cache: CacheArg = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        call = Inpaint(
            image=image,
            references=references or (),
            mask=mask,
            boxes=boxes,
            strength=strength,
            prompt=prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            num_images=num_images,
            session=session,
            loras=lora_pairs(loras),
            step_cache=step_cache_pair(cache),
        )
        return await run_call(studio, ctx, call)


def reference_list(images: list[str] | str) -> list[str]:
    """compose's `images`: a list as given, or one string of ids (`id_list`, view_image's reading)."""
    if isinstance(images, list):
        return images
    ids = id_list(images)
    if ids is None:
        raise ToolError(
            'images must be a list, one string per image: pass a list, e.g. ["img_a", "/path/b.png"] (one string '
            "is read as a list only when it holds image ids separated by commas or spaces)"
        )
    return ids


def lora_pairs(loras: list[LoraChoice] | None) -> list[tuple[str, float | None]] | None:
    """The adapters a tool call chose, as (name, scale or None) pairs."""
    return None if loras is None else [(choice.name, choice.scale) for choice in loras]


def step_cache_pair(cache: StepCacheChoice | None) -> tuple[str, float | None] | None:
    """The step cache a tool call chose, as a (kind, threshold or None) pair."""
    return None if cache is None else (cache.kind, cache.threshold)


async def run_call(studio: Studio, ctx: Context, call: ImageCall) -> CallToolResult:
    """The one path of the image tools: `Studio.make` with the client's progress, as a tool result."""

    async def progress(value: float, total: float | None, message: str) -> None:
        await ctx.report_progress(value, total, message)

    with tool_errors():
        made = await studio.make(replace(call, call_id=idempotency_key(ctx)), progress=progress)
    return images_result(made)


def idempotency_key(ctx: Context) -> str | None:
    """The client's idempotency key (`_meta[IDEMPOTENCY_META_KEY]`, checked with the call), else None: then
    `Studio.make` gives the call a fresh one."""
    meta = ctx.request_context.meta or {}
    given = meta.get(IDEMPOTENCY_META_KEY)
    return None if given is None else check_call_id(given)
