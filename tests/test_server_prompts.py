"""MCP prompts loaded from prompts/*.md: listing, rendering, attached contact sheets, and the file format."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from mcp import Client
from PIL import Image

from klein_agent.rules import layout, upsampling
from klein_agent.server.prompts import load_prompt_files, parse_prompt_file, prompts_dir, render_body

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_prompts_are_listed_with_their_arguments(client: Client) -> None:
    prompts = {p.name: p for p in (await client.list_prompts()).prompts}
    assert set(prompts) == {"iterate_image", "compare_images", "flux3_caption"}
    assert [(a.name, a.required) for a in prompts["flux3_caption"].arguments or []] == [
        ("request", True),
        ("image_ids", False),
        ("layout", False),
    ]
    iterate = prompts["iterate_image"]
    assert iterate.title == "Iterate on an image toward a goal"
    assert [(a.name, a.required) for a in iterate.arguments or []] == [
        ("goal", True),
        ("image_id", False),
        ("checklist", False),
        ("max_rounds", False),
    ]


async def test_iterate_prompt_renders_the_loop_and_attaches_the_start_image(client: Client) -> None:
    plain = await client.get_prompt("iterate_image", {"goal": "a red bicycle leaning on a blue door"})
    assert len(plain.messages) == 1
    text = plain.messages[0].content.text  # type: ignore[union-attr]
    assert "a red bicycle leaning on a blue door" in text
    assert "none yet: start with `generate`" in text and "5 edit rounds" in text
    assert "checklist" in text.lower() and "positively" in text and "view_image" in text

    made = await client.call_tool("generate", {"prompt": "a bicycle", "width": 64, "height": 64})
    image_id = made.structured_content["images"][0]["image_id"]
    started = await client.get_prompt(
        "iterate_image", {"goal": "a red bicycle", "image_id": image_id, "max_rounds": "3"}
    )
    assert [m.content.type for m in started.messages] == ["text", "image"]
    assert image_id in started.messages[0].content.text  # type: ignore[union-attr]
    assert "3 edit rounds" in started.messages[0].content.text  # type: ignore[union-attr]


async def test_compare_prompt_attaches_a_labelled_contact_sheet(client: Client) -> None:
    made = await client.call_tool(
        "generate", {"prompt": "a vase", "width": 64, "height": 64, "num_images": 3}
    )
    ids = [i["image_id"] for i in made.structured_content["images"]]
    rendered = await client.get_prompt(
        "compare_images", {"image_ids": ", ".join(ids), "goal": "the roundest vase"}
    )
    text, image = rendered.messages
    assert all(i in text.content.text for i in ids)  # type: ignore[union-attr]
    assert "the roundest vase" in text.content.text  # type: ignore[union-attr]
    assert image.content.type == "image" and image.content.mime_type in ("image/webp", "image/jpeg")
    sheet = Image.open(io.BytesIO(base64.b64decode(image.content.data)))  # type: ignore[union-attr]
    assert sheet.width > 64 * 2, "three cells side by side, not one image"


async def test_caption_prompt_carries_the_upsamplers_instructions_for_the_mode(client: Client) -> None:
    """The agent gets BFL's system prompt for the mode the inputs imply, the user turn as the upsampler sees it,
    and which tool takes the caption; an edit's images are attached."""
    new = await client.get_prompt("flux3_caption", {"request": "a lighthouse at dusk"})
    (only,) = new.messages
    text = only.content.text  # type: ignore[union-attr]
    assert upsampling.system_prompt("t2i") in text and upsampling.system_prompt("i2i") not in text
    assert "a lighthouse at dusk" in text and "call `generate`" in text and "`caption`" in text

    made = await client.call_tool(
        "generate", {"prompt": "a lighthouse", "width": 64, "height": 64, "num_images": 2}
    )
    ids = [i["image_id"] for i in made.structured_content["images"]]
    edit = await client.get_prompt("flux3_caption", {"request": "make it night", "image_ids": ids[0]})
    text = edit.messages[0].content.text  # type: ignore[union-attr]
    assert upsampling.system_prompt("i2i") in text and upsampling.edit_scaffold("make it night") in text
    assert "call `edit`" in text
    assert [m.content.type for m in edit.messages] == ["text", "image"]
    both = await client.get_prompt("flux3_caption", {"request": "merge them", "image_ids": " ".join(ids)})
    assert "call `compose`" in both.messages[0].content.text  # type: ignore[union-attr]


async def test_caption_prompt_with_a_layout_teaches_the_box_mode(client: Client) -> None:
    """With `layout` the agent gets the box mode's system prompt and the request wrapped around the locked rows,
    exactly as the upsampler gets them, and is told to pass the same layout; bad boxes are named."""
    boxes = [{"box": [0.1, 0.05, 0.9, 0.45], "label": "a lighthouse"}]
    rows = layout.layout_rows([layout.layout_box(boxes[0], 1)], edit=False)
    new = await client.get_prompt("flux3_caption", {"request": "a coast", "layout": json.dumps(boxes)})
    text = new.messages[0].content.text  # type: ignore[union-attr]
    assert upsampling.system_prompt("t2i_bbox") in text and upsampling.system_prompt("t2i") not in text
    assert layout.layout_request("a coast", rows) in text and "[100, 50, 900, 450]" in text
    assert "`layout` set to the same boxes" in text
    made = await client.call_tool("generate", {"prompt": "a lighthouse", "width": 64, "height": 64})
    image_id = made.structured_content["images"][0]["image_id"]
    edit = await client.get_prompt(
        "flux3_caption", {"request": "add one", "image_ids": image_id, "layout": json.dumps(boxes)}
    )
    text = edit.messages[0].content.text  # type: ignore[union-attr]
    edit_rows = layout.layout_rows([layout.layout_box(boxes[0], 1)], edit=True)
    assert upsampling.system_prompt("i2i_bbox") in text
    assert upsampling.edit_scaffold(layout.layout_request("add one", edit_rows), True) in text
    for bad, message in [
        ("[{", "layout is not JSON"),
        ('{"box": []}', "layout is not a JSON list"),
        ('[{"box": [0.5, 0, 0.1, 1], "label": "x"}]', r"layout box 1 .* is inverted"),
    ]:
        with pytest.raises(Exception, match=message):
            await client.get_prompt("flux3_caption", {"request": "x", "layout": bad})


async def test_a_layout_sent_to_a_flux2_model_is_refused_not_ignored(client: Client) -> None:
    boxes = [{"box": [0, 0, 0.5, 0.5], "label": "a vase"}]
    done = await client.call_tool(
        "generate", {"prompt": "a vase", "layout": boxes, "width": 64, "height": 64}
    )
    assert done.is_error
    assert "layout is for FLUX 3 [klein] models" in done.content[0].text  # type: ignore[union-attr]
    inverted = [{"box": [0.5, 0, 0.1, 0.5], "label": "a vase"}]
    done = await client.call_tool("generate", {"prompt": "a vase", "layout": inverted})
    assert done.is_error
    assert "layout box 1 [0.5, 0.0, 0.1, 0.5] is inverted" in done.content[0].text  # type: ignore[union-attr]


async def test_caption_prompt_refuses_more_images_than_the_upsampler_takes(client: Client) -> None:
    ids = " ".join(f"img_{'A' * 20}{k:02d}" for k in range(11))
    with pytest.raises(Exception, match="at most 10 images, got 11"):
        await client.get_prompt("flux3_caption", {"request": "x", "image_ids": ids})


async def test_a_caption_sent_to_a_flux2_model_is_refused_not_ignored(client: Client) -> None:
    done = await client.call_tool(
        "generate", {"prompt": "a vase", "caption": "A tall blue vase.", "width": 64, "height": 64}
    )
    assert done.is_error
    assert "caption is for FLUX 3 [klein] models" in done.content[0].text  # type: ignore[union-attr]


def test_prompt_files_parse_and_render() -> None:
    files = load_prompt_files()
    assert [f.name for f in files] == ["compare_images", "iterate_image"]
    assert Path(str(prompts_dir())).name == "prompts"
    spec = parse_prompt_file(
        "---\nname: p\ndescription: d\nargument x: required | the x\nattach: x\n---\nHello {{x}} {{y|fallback}}.\n",
        "p.md",
    )
    assert spec.attach == "x" and spec.arguments[0].required
    assert render_body(spec.body, {"x": "world"}) == "Hello world fallback.\n"
    for broken in [
        "no front matter",
        "---\nname: p\n---\nbody",
        "---\nname: p\ndescription: d\nattach: z\n---\n",
    ]:
        with pytest.raises(ValueError):
            parse_prompt_file(broken, "broken.md")
