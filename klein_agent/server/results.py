"""Building the CallToolResults of the image tools: one preview, a short summary, links, structured content.

Content order (docs/mcp-notes.md §5.1): the inline preview first (WebP or JPEG, long edge <= 1024 px, within the
base64 budget; several images become one labelled contact sheet), then the text summary (ids, seeds, size, time,
parents, what to do next), then one `resource_link` per image. The structured content repeats the facts as a
small JSON object and never carries image bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from mcp_types import CallToolResult, ImageContent, ResourceLink, TextContent
from PIL import Image

from klein_agent.server.models import ImageRef, ImagesResult
from klein_agent.service.previews import Preview, make_preview
from klein_agent.service.store import StoredImage

NEXT_STEPS = (
    "Next: to change one, call edit with its image_id and describe the result you want positively (what should "
    "be there, not what should not); keep the same seed to change less. To combine several, call compose and "
    'refer to them as "image 1", "image 2", ... in the order given. If you cannot see the preview, call '
    "view_image with the ids."
)


def image_uri(image_id: str) -> str:
    return f"image://{image_id}"


def preview_labels(images: Sequence[StoredImage], seeds: Sequence[int | None]) -> list[str]:
    if len(images) == 1:
        return [images[0].image_id]
    return [
        f"{k} {img.image_id}" + (f" seed {seed}" if seed is not None else "")
        for k, (img, seed) in enumerate(zip(images, seeds, strict=True), start=1)
    ]


def build_preview(
    pictures: Sequence[Image.Image], labels: Sequence[str], *, max_edge: int, budget_b64: int
) -> Preview:
    return make_preview(pictures, labels, max_edge=max_edge, budget_b64=budget_b64)


def image_block(preview: Preview) -> ImageContent:
    return ImageContent(
        type="image", data=base64.b64encode(preview.data).decode("ascii"), mime_type=preview.mime_type
    )


def link_block(image: StoredImage, seed: int | None) -> ResourceLink:
    what = f"{image.width}x{image.height} PNG" + (f", seed {seed}" if seed is not None else "")
    return ResourceLink(
        type="resource_link",
        name=image.image_id,
        uri=image_uri(image.image_id),
        mime_type="image/png",
        size=image.size_bytes,
        description=f"full-resolution {what}; recipe at {image_uri(image.image_id)}/meta",
    )


def images_result(
    *,
    tool: str,
    stored: Sequence[StoredImage],
    seeds: Sequence[int],
    parents: Sequence[str],
    preview: Preview,
    elapsed_ms: float,
    model_ms: float,
    steps: int,
    session: str | None,
    cache_hits: dict[str, int],
) -> CallToolResult:
    refs = [
        ImageRef(
            image_id=img.image_id,
            uri=image_uri(img.image_id),
            seed=seed,
            width=img.width,
            height=img.height,
            parents=list(parents),
        )
        for img, seed in zip(stored, seeds, strict=True)
    ]
    n = len(stored)
    first = stored[0]
    seed_text = f"seed {seeds[0]}" if n == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    lines = [
        f"{tool}: made {n} image{'s' if n > 1 else ''} of {first.width}x{first.height} in {elapsed_ms:.0f} ms "
        f"(model {model_ms:.0f} ms), {steps} steps, {seed_text}"
        + (f', session "{session}"' if session else "")
        + ".",
    ]
    lines += [
        f"{k}. {img.image_id} (seed {seed})"
        for k, (img, seed) in enumerate(zip(stored, seeds, strict=True), start=1)
    ]
    if parents:
        lines.append(
            "Made from: " + ", ".join(f"image {k} = {pid}" for k, pid in enumerate(parents, start=1)) + "."
        )
    hits = {k: v for k, v in cache_hits.items() if v}
    if hits:
        lines.append(
            "Reused from earlier calls: " + ", ".join(f"{k} x{v}" for k, v in sorted(hits.items())) + "."
        )
    sheet = (
        f"The preview above is one contact sheet, labelled 1-{n} in this order"
        if n > 1
        else "The preview above is the image"
    )
    lines.append(f"{sheet} ({preview.width}x{preview.height}; full resolution via the image:// links).")
    lines.append(NEXT_STEPS)
    structured = ImagesResult(
        images=refs,
        elapsed_ms=round(elapsed_ms),
        model_ms=round(model_ms),
        steps=steps,
        session=session,
        cache_hits=dict(cache_hits),
        note=NEXT_STEPS,
    )
    return CallToolResult(
        content=[
            image_block(preview),
            TextContent(type="text", text="\n".join(lines)),
            *(link_block(img, seed) for img, seed in zip(stored, seeds, strict=True)),
        ],
        structured_content=structured.model_dump(mode="json"),
    )
