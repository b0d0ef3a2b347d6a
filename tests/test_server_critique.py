"""compare_images, view_image's region and record_verdict through the official Python SDK client (both protocol
eras), on the tiny model's server, with pictures of known content put in the real store; bad inputs included.
`serve --model tiny` as a subprocess speaks them over stdio in test_server_critique_stdio.py."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
from mcp import Client
from PIL import Image

from klein_agent.rules.limits import (
    OVERLAY_MAX_BYTES,
    VERDICT_NOTES_SHOWN,
    VERDICT_REASON_MAX_CHARS,
    ZOOM_MIN_EDGE,
)
from klein_agent.service.store import new_image_id

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
    return field.resize((width, height), Image.Resampling.BICUBIC)


def stored(state: Any, picture: Image.Image, **kwargs: Any) -> str:
    data = io.BytesIO()
    picture.save(data, "PNG")
    recipe = {"tool": "import", "source": "test"}
    image = state.store.put(
        data.getvalue(), width=picture.width, height=picture.height, recipe=recipe, **kwargs
    )
    return str(image.image_id)


async def ok(client: Client, tool: str, args: dict[str, Any]) -> Any:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result


async def error(client: Client, tool: str, args: dict[str, Any]) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool} {args} was not refused"
    text = str(result.content[0].text)
    assert "Traceback" not in text
    return text


def decoded(block: Any) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(block.data)))


async def test_compare_images_reports_the_changed_box_overlay_and_verdict(
    client: Client, server_state: Any
) -> None:
    a = smooth(256, 192)
    b = a.copy()
    b.paste((0, 255, 0), (64, 96, 112, 128))  # 48x32 px at (64, 96): three by two tokens
    a_id, b_id = stored(server_state, a), stored(server_state, b, parents=[])
    result = await ok(client, "compare_images", {"a": a_id, "b": f"image://{b_id}"})
    assert [block.type for block in result.content] == ["image", "text"]
    overlay = result.content[0]
    assert (
        overlay.mime_type in ("image/webp", "image/jpeg")
        and len(base64.b64decode(overlay.data)) <= OVERLAY_MAX_BYTES
    )
    assert decoded(overlay).size == (256, 192)
    found = result.structured_content
    assert [r["box_px"] for r in found["regions"]] == [[64, 96, 48, 32]]
    assert found["regions"][0]["box_frac"] == [0.25, 0.5, 0.1875, 0.1667]
    assert found["changed_pct"] == pytest.approx(100 * 48 * 32 / (256 * 192), abs=0.005)
    assert (found["a"], found["b"], found["alignment"]) == (a_id, b_id, "same size")
    assert found["delta_e"].startswith("CIE76") and 0 < found["ssim"] < 1
    assert found["verdict"] in result.content[1].text
    assert len(json.dumps(found)) < 3000, "no image bytes in the structured content"

    inside = await ok(client, "compare_images", {"a": a_id, "b": b_id, "expected_box": [0.2, 0.4, 0.3, 0.3]})
    assert "inside the box you asked for" in inside.structured_content["verdict"]
    leaked = await ok(client, "compare_images", {"a": a_id, "b": b_id, "expected_box": [0, 0, 32, 32]})
    assert "outside the box you asked for" in leaked.structured_content["verdict"]
    # the regions it found go straight into inpaint: the same boxes are accepted there
    box = found["regions"][0]["box_px"]
    inpainted = await ok(client, "inpaint", {"image": b_id, "prompt": "grass", "boxes": [box], "seed": 1})
    assert inpainted.structured_content["images"][0]["width"] == 256


async def test_compare_images_bad_inputs_are_named_and_the_server_keeps_serving(
    client: Client, server_state: Any
) -> None:
    a_id = stored(server_state, smooth(128, 128))
    tiny = stored(server_state, Image.new("RGB", (1, 1), (200, 10, 10)))
    wide = stored(server_state, smooth(256, 128))
    missing = new_image_id()
    assert f"Unknown image id '{missing}'" in await error(client, "compare_images", {"a": a_id, "b": missing})
    # not an id at all: the one image-reference rule (rules/image_refs.py) says what an id looks like
    assert (
        "'nope' is not an image id, and this argument takes ids only: an id is img_ followed by 22"
        in await error(client, "compare_images", {"a": "nope", "b": a_id})
    )
    assert f"{tiny} is 1x1: compare_images needs pictures at least 16 px a side" in await error(
        client, "compare_images", {"a": a_id, "b": tiny}
    )
    assert "their aspect ratios differ by more than 2%" in await error(
        client, "compare_images", {"a": a_id, "b": wide}
    )
    assert "expected_box [10, 10, -5, 5] is not a region" in await error(
        client, "compare_images", {"a": a_id, "b": a_id, "expected_box": [10, 10, -5, 5]}
    )
    assert "expected_box has 3 numbers" in await error(
        client, "compare_images", {"a": a_id, "b": a_id, "expected_box": [1, 2, 3]}
    )
    same = await ok(client, "compare_images", {"a": a_id, "b": a_id})
    assert same.structured_content["verdict"].startswith("No change")


async def test_view_image_region_is_full_resolution_and_small_regions_are_enlarged_sharply(
    client: Client, server_state: Any
) -> None:
    picture = Image.new("RGB", (512, 384), (20, 20, 20))
    picture.paste((250, 200, 0), (100, 40, 108, 48))  # an 8x8 block
    image_id = stored(server_state, picture)
    result = await ok(client, "view_image", {"image_ids": image_id, "region": [96, 36, 16, 16]})
    shown = decoded(result.content[0]).convert("RGB")
    factor = ZOOM_MIN_EDGE // 16
    assert shown.size == (16 * factor, 16 * factor)
    centre = shown.getpixel((8 * factor, 8 * factor))
    corner = shown.getpixel((factor, factor))
    assert max(abs(c - e) for c, e in zip(centre, (250, 200, 0), strict=True)) <= 8, (
        "lossy preview, sharp block"
    )
    assert max(corner) <= 30
    assert f"{image_id}: region [96, 36, 16, 16] px of 512x384" in result.content[1].text
    # fractions, and a region larger than max_edge comes scaled down to it
    half = await ok(client, "view_image", {"image_ids": image_id, "region": [0, 0, 0.5, 1], "max_edge": 128})
    width, height = decoded(half.content[0]).size  # the 256x384 region, its long edge scaled to 128
    assert height == 128 and abs(width - 256 * 128 / 384) <= 1
    full = await ok(client, "view_image", {"image_ids": image_id, "region": [0, 0, 256, 256]})
    assert decoded(full.content[0]).size == (256, 256) and "(1:1)" in full.content[1].text


async def test_view_image_region_bad_inputs_and_a_one_pixel_picture(
    client: Client, server_state: Any
) -> None:
    image_id = stored(server_state, smooth(128, 96))
    one = stored(server_state, Image.new("RGB", (1, 1), (0, 0, 255)))
    cases = {
        "empty": ([10, 10, 0, 5], "region [10, 10, 0, 5] is not a region"),
        "inverted": ([50, 50, -20, -20], "region [50, 50, -20, -20] is not a region"),
        "outside": ([500, 0, 10, 10], "region [500, 0, 10, 10] (pixels) lies outside the 128x96 image"),
        "under a pixel": ([0.5, 0.5, 0.001, 0.001], "covers less than one pixel of the 128x96 image"),
        "three numbers": ([1, 2, 3], "region has 3 numbers: give [x, y, width, height]"),
    }
    for case, (region, message) in cases.items():
        text = await error(client, "view_image", {"image_ids": image_id, "region": region})
        assert message in text, (case, text)
    assert "Unknown image id" in await error(
        client, "view_image", {"image_ids": new_image_id(), "region": [0, 0, 1, 1]}
    )
    whole = await ok(client, "view_image", {"image_ids": one, "region": [0, 0, 1, 1]})
    assert decoded(whole.content[0]).size == (ZOOM_MIN_EDGE, ZOOM_MIN_EDGE), "1 px, enlarged to be seen"
    sheet = await ok(client, "view_image", {"image_ids": [image_id, one], "region": [0, 0, 1, 1]})
    assert sheet.structured_content["images"][1]["image_id"] == one


async def test_verdicts_through_the_client_ten_on_one_image(client: Client, server_state: Any) -> None:
    first, second = (
        stored(server_state, smooth(64, 64), session="v"),
        stored(server_state, smooth(64, 64, 1), session="v"),
    )
    said = []
    for k in range(10):  # pick, note, reject, note, ... : the latest pick or reject wins, notes add up
        verdict = ("pick", "note", "reject", "note", "pick")[k % 5]
        result = await ok(
            client, "record_verdict", {"image_id": first, "verdict": verdict, "reason": f"reason {k}"}
        )
        said.append((verdict, f"reason {k}"))
        assert result.structured_content["verdict"] == verdict
    assert result.structured_content["standing"] == "pick"
    listed = await ok(client, "list_images", {"session": "v"})
    entry = {i["image_id"]: i for i in listed.structured_content["images"]}[first]
    assert (entry["verdict"], entry["verdict_reason"]) == ("pick", "reason 9")
    notes = [reason for verdict, reason in reversed(said) if verdict == "note"][:VERDICT_NOTES_SHOWN]
    assert entry["notes"] == notes
    assert f"{first}" in listed.content[0].text and "PICK: reason 9" in listed.content[0].text
    others = {i["image_id"]: i for i in listed.structured_content["images"]}[second]
    assert (others["verdict"], others["notes"]) == (None, [])
    picks = await ok(client, "list_images", {"standing": "pick"})
    assert [i["image_id"] for i in picks.structured_content["images"]] == [first]
    await ok(client, "record_verdict", {"image_id": first, "verdict": "reject", "reason": "hands"})
    assert (await ok(client, "list_images", {"standing": "pick"})).structured_content["images"] == []


async def test_verdict_bad_inputs_are_named_and_store_nothing(client: Client, server_state: Any) -> None:
    image_id = stored(server_state, smooth(64, 64))
    missing = new_image_id()
    assert "Unknown image id" in await error(
        client, "record_verdict", {"image_id": missing, "verdict": "pick"}
    )
    text = await error(client, "record_verdict", {"image_id": image_id, "verdict": "love", "reason": "x"})
    assert "verdict must be one of pick, reject, note, got 'love'" in text
    text = await error(client, "record_verdict", {"image_id": image_id, "verdict": "note"})
    assert "a note needs a reason" in text
    long = "y" * (VERDICT_REASON_MAX_CHARS + 1)
    text = await error(client, "record_verdict", {"image_id": image_id, "verdict": "pick", "reason": long})
    assert f"reason is {VERDICT_REASON_MAX_CHARS + 1} characters; at most {VERDICT_REASON_MAX_CHARS}" in text
    huge = "z" * 5000  # over the published maxLength too: the same sentence
    text = await error(client, "record_verdict", {"image_id": image_id, "verdict": "pick", "reason": huge})
    assert f"reason is 5000 characters; at most {VERDICT_REASON_MAX_CHARS}" in text
    assert "standing must be one of pick, reject" in await error(client, "list_images", {"standing": "note"})
    assert server_state.store.verdicts([image_id]) == {}


async def test_the_loop_is_taught_by_the_prompt_and_the_instructions(client: Client) -> None:
    rendered = await client.get_prompt("iterate_image", {"goal": "a red bicycle"})
    text = rendered.messages[0].content.text  # type: ignore[union-attr]
    for step in (
        "compare_images",
        "expected_box",
        "`region`",
        "record_verdict",
        "inpaint",
        'standing="pick"',
    ):
        assert step in text, step
    instructions = client.instructions or ""
    for tool in ("compare_images", "view_image(region=", "record_verdict", "inpaint", "iterate_image"):
        assert tool in instructions, tool
    tools = {tool.name for tool in (await client.list_tools()).tools}
    assert {"compare_images", "record_verdict"} <= tools
