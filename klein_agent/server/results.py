"""Building the CallToolResults of the image tools: one preview, a short summary, links, structured content.

Content order: the inline preview first (WebP or JPEG, long edge <= 1024 px, within the base64 budget; several
images become one labelled contact sheet), then the text summary (ids, seeds, size, time, parents, what to do
next), then one `resource_link` per image; docs/server.md ("What an image tool returns") explains why. The
structured content repeats the facts as a small JSON object and never carries image bytes.
"""

from __future__ import annotations

import base64

from mcp_types import CallToolResult, ImageContent, ResourceLink, TextContent

from klein_agent.rules.upsampling import CAPTION_SENTENCES
from klein_agent.server.models import ImageRef, ImagesResult
from klein_agent.service.making import NewImages
from klein_agent.service.previews import Preview
from klein_agent.service.store import StoredImage

# One line, not a paragraph: it comes back with every result of a loop; the how-to lives in the tool descriptions.
NEXT_STEPS = "Next: edit or compose with these ids, or view_image to look again."


def image_uri(image_id: str) -> str:
    """The resource URI of a stored image's PNG."""
    return f"image://{image_id}"


def image_block(preview: Preview) -> ImageContent:
    """A preview as inline image content (base64, its own MIME type)."""
    return ImageContent(
        type="image", data=base64.b64encode(preview.data).decode("ascii"), mime_type=preview.mime_type
    )


def link_block(image: StoredImage, seed: int | None) -> ResourceLink:
    """A link to a stored image's full-resolution PNG, with its size and seed."""
    what = f"{image.width}x{image.height} PNG" + (f", seed {seed}" if seed is not None else "")
    return ResourceLink(
        type="resource_link",
        name=image.image_id,
        uri=image_uri(image.image_id),
        mime_type="image/png",
        size=image.size_bytes,
        description=f"full-resolution {what}; recipe at {image_uri(image.image_id)}/meta",
    )


def images_result(made: NewImages) -> CallToolResult:
    """What an image tool returns for `made`; a call whose pictures no seeded model run made (`made.run` None)
    reports no seeds, steps or model time."""
    stored, seeds, parents, run = made.images, made.seeds, made.parents, made.run
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
    how = ""
    if run is not None:
        seed_text = f"seed {run.seeds[0]}" if n == 1 else f"seeds {run.seeds[0]}-{run.seeds[-1]}"
        how = f" (model {run.model_ms:.0f} ms), {run.steps} steps, {seed_text}"
    lines = [
        f"{made.tool}: made {n} image{'s' if n > 1 else ''} of {first.width}x{first.height} in "
        f"{made.elapsed_ms:.0f} ms{how}" + (f', session "{made.session}"' if made.session else "") + ".",
    ]
    lines += [
        f"{k}. {img.image_id}" + (f" (seed {seed})" if seed is not None else "")
        for k, (img, seed) in enumerate(zip(stored, seeds, strict=True), start=1)
    ]
    if parents:
        lines.append(
            "Made from: " + ", ".join(f"image {k} = {pid}" for k, pid in enumerate(parents, start=1)) + "."
        )
    for gone in made.gone:
        lines.append(
            f"{gone} is no longer in the store (deleted while this call ran): the lineage keeps its id, but it "
            "cannot be viewed or used again."
        )
    cache_hits = {} if run is None else dict(run.cache_hits)
    hits = {k: v for k, v in cache_hits.items() if v}
    if hits:
        lines.append(
            "Reused from earlier calls: " + ", ".join(f"{k} x{v}" for k, v in sorted(hits.items())) + "."
        )
    preview = made.preview
    sheet = (
        f"The preview above is one contact sheet, labelled 1-{n} in this order"
        if n > 1
        else "The preview above is the image"
    )
    lines.append(f"{sheet} ({preview.width}x{preview.height}; full resolution via the image:// links).")
    if run is not None and run.caption_source is not None:
        lines.append(f"Text encoded: {CAPTION_SENTENCES[run.caption_source]}.")
    lines += [f"Note: {note}." for note in made.notes]
    lines.append(NEXT_STEPS)
    structured = ImagesResult(
        images=refs,
        elapsed_ms=round(made.elapsed_ms),
        model_ms=0 if run is None else round(run.model_ms),
        steps=None if run is None else run.steps,
        session=made.session,
        cache_hits=cache_hits,
        notes=list(made.notes),
        caption_source=None if run is None else run.caption_source,
    )
    return CallToolResult(
        content=[
            image_block(preview),
            TextContent(type="text", text="\n".join(lines)),
            *(link_block(img, seed) for img, seed in zip(stored, seeds, strict=True)),
        ],
        structured_content=structured.model_dump(mode="json"),
    )
