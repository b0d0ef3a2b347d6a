"""What the FLUX 3 prompt upsampler is asked, as BFL's pup and diffusers' upsampler block ask it. No torch.

BFL trained FLUX 3 [klein] on captions written by its prompt upsampler (a Qwen3.5 fine-tune): a short request
becomes the long caption the model was trained on. This module holds the upsampler's side that needs no model: its
four system prompts (shipped as `data/flux3_upsampler_prompts.json`, with their provenance), the mode a call is in,
the chat messages, and how a reference picture is prepared before the upsampler sees it. The MCP prompt that hands
the same instructions to a calling agent reads them from here too, so both ways ask the same thing.

With a layout (`rules.layout`: boxes placing objects), the modes are t2i_bbox and i2i_bbox: the request is wrapped
around the locked box rows and the answer goes through `layout.reconcile`, as in diffusers' block.
"""

from __future__ import annotations

import io
import json
import math
import unicodedata
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from PIL import Image, ImageOps

from klein_agent.rules import layout, limits
from klein_agent.rules.resolution import RequestError

MODES = ("t2i", "i2i", "t2i_bbox", "i2i_bbox")


@cache
def _data() -> dict[str, Any]:
    text = (
        resources.files("klein_agent.rules").joinpath("data/flux3_upsampler_prompts.json").read_text("utf-8")
    )
    data: dict[str, Any] = json.loads(text)
    return data


def system_prompt(mode: str) -> str:
    """The upsampler's system prompt for `mode` ("t2i", "i2i", "t2i_bbox" or "i2i_bbox"), verbatim from BFL's pup
    repo. Raises KeyError for another mode."""
    prompt: str = _data()["system_prompts"][mode]
    return prompt


def edit_scaffold(request: str, boxes: bool = False) -> str:
    """The text of an edit's user turn, after its pictures: the request inside diffusers' I2I scaffold (its
    layout variant with `boxes`, which names the pictures ref_image_0, ref_image_1, ... as the box table does)."""
    scaffold: str = _data()["i2i_scaffold"]["boxes" if boxes else "plain"]
    return scaffold.format(instruction=request)


def mode(reference_count: int, boxes: bool = False) -> str:
    """The upsampler's mode for a call with this many references, and a layout or not: "i2i" with any reference,
    else "t2i"; "_bbox" appended with a layout."""
    return ("i2i" if reference_count else "t2i") + ("_bbox" if boxes else "")


def layout_rows(boxes: Sequence[layout.LayoutBox], reference_count: int) -> list[dict[str, Any]]:
    """The locked rows of a call's layout, in its mode's spelling (an edit's are new content at the target)."""
    return layout.layout_rows(boxes, edit=bool(reference_count))


def messages(
    request: str, references: list[Image.Image], rows: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The chat the upsampler answers: [system prompt of the mode, user turn]. The user turn is the request (t2i),
    or the prepared references (`prepare_references`) followed by the request in the edit scaffold (i2i). With
    layout `rows` (`layout_rows`) the request is first wrapped around them (`layout.layout_request`) and the mode
    is the box one. Content is a list of parts throughout, as diffusers writes it, so the checkpoint's chat
    template renders it the same."""
    if rows:
        request = layout.layout_request(request, rows)
    if references:
        content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in references]
        content.append({"type": "text", "text": edit_scaffold(request, bool(rows))})
    else:
        content = [{"type": "text", "text": request}]
    system = system_prompt(mode(len(references), bool(rows)))
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": content},
    ]


def reference_size(width: int, height: int, reference_count: int) -> tuple[int, int]:
    """(width, height) a reference is resized to for the upsampler: sides rounded to multiples of 32, within the
    pixel budget for `reference_count` references (limits.UPSAMPLER_REFERENCE_PIXELS). BFL's `reference_size`.

    Raises ValueError for an aspect ratio over 200:1 or a count outside 1..UPSAMPLER_MAX_REFERENCES."""
    if reference_count not in limits.UPSAMPLER_REFERENCE_PIXELS:
        raise ValueError(
            f"the prompt upsampler takes 1 to {limits.UPSAMPLER_MAX_REFERENCES} references, got {reference_count}"
        )
    if max(width, height) / min(width, height) > limits.UPSAMPLER_REFERENCE_MAX_ASPECT:
        raise ValueError(
            f"a {width}x{height} reference is longer than {limits.UPSAMPLER_REFERENCE_MAX_ASPECT}:1, which the "
            "prompt upsampler does not take; crop it"
        )
    step = limits.UPSAMPLER_REFERENCE_MULTIPLE

    def floor(value: float) -> int:
        return max(step, math.floor(value / step) * step)

    budget = limits.UPSAMPLER_REFERENCE_PIXELS[reference_count]
    w = max(step, round(width / step) * step)
    h = max(step, round(height / step) * step)
    if w * h > budget:
        scale = math.sqrt(width * height / budget)
        w, h = floor(width / scale), floor(height / scale)
    if w * h > budget:  # the floor of a very long side can still leave one side at the minimum
        if w == step:
            h = floor(budget / w)
        else:
            w = floor(budget / h)
    return w, h


def prepare_reference(image: Image.Image, reference_count: int) -> Image.Image:
    """A reference as the upsampler saw them in training (BFL's `policy_reference`): EXIF orientation applied,
    transparency over white, RGB, LANCZOS-resized to `reference_size`, re-encoded as JPEG quality 92 and decoded.
    Raises ValueError as `reference_size` does."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    size = reference_size(image.width, image.height, reference_count)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=limits.UPSAMPLER_JPEG_QUALITY)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def prepare_references(images: list[Image.Image]) -> list[Image.Image]:
    """Every reference of a call prepared for the upsampler (the budget follows how many there are).
    Raises ValueError for more than UPSAMPLER_MAX_REFERENCES, or as `reference_size` does."""
    if len(images) > limits.UPSAMPLER_MAX_REFERENCES:
        raise ValueError(
            f"the prompt upsampler takes at most {limits.UPSAMPLER_MAX_REFERENCES} references, got {len(images)}"
        )
    return [prepare_reference(image, len(images)) for image in images]


def clean_caption(caption: str) -> str:
    """A caller's caption as the text encoder gets it: control characters (but newlines and tabs) and surrounding
    space removed, otherwise verbatim. Raises RequestError for text that is not valid Unicode, an empty caption,
    or one over limits.MAX_CAPTION_CHARS characters."""
    if any("\ud800" <= ch <= "\udfff" for ch in caption):
        raise RequestError("the caption is not valid UTF-8 text: set your terminal to UTF-8 or re-type it")
    text = "".join(ch for ch in caption if ch in "\n\t" or unicodedata.category(ch) != "Cc").strip()
    if not text:
        raise RequestError(
            "the caption is empty: leave it out to use the prompt (or the upsampler), or write the full caption"
        )
    if len(text) > limits.MAX_CAPTION_CHARS:
        raise RequestError(
            f"the caption is {len(text)} characters long, over the {limits.MAX_CAPTION_CHARS} limit: BFL's "
            "upsampler writes 100 to 350 words; shorten it"
        )
    return text


def _caption_sentences(caption: str, upsampler: str) -> dict[str, str]:
    """What a FLUX 3 result says about the text its model encoded, by where it came from (limits.CAPTION_SOURCES):
    one sentence for the tool result and the CLI, each naming its own way to give a caption or the upsampler."""
    return {
        "upsampler": "caption written by the prompt upsampler from the prompt (stored in the recipe)",
        "caller": "caption used as the caller gave it",
        "prompt": "prompt encoded as given: BFL trained FLUX 3 on upsampled captions and says to upsample; pass "
        f"{caption} or {upsampler}",
    }


CAPTION_SENTENCES = _caption_sentences(  # a tool result's
    "`caption` (the flux3_caption prompt has the upsampler's instructions)",
    "start the server with --prompt-upsampler",
)
CLI_CAPTION_SENTENCES = _caption_sentences(  # `generate`'s stderr
    "--caption (a full caption, as BFL's upsampler writes: 100 to 350 words)",
    "add --prompt-upsampler PATH|REPO",
)
