"""The inpaint tool through a real in-process MCP client on the tiny model: boxes and mask files, lineage, the
recipe that remakes the same PNG, and every bad input refused before the model runs, with nothing stored."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from PIL import Image, ImageDraw

from tests.fakes import data_uri
from tests.test_server_tools import call, ids_of, read_meta, read_png

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def test_inpaint_with_boxes_keeps_lineage_and_reruns_byte_for_byte(client: Client) -> None:
    source = ids_of(
        await call(client, "generate", {"prompt": "a room", "width": 96, "height": 64, "seed": 1})
    )[0]
    args = {"image": source, "prompt": "a window", "boxes": [[0.5, 0, 0.5, 0.5], [8, 40, 32, 24]], "seed": 5}
    result = await call(client, "inpaint", args)
    image = result.structured_content["images"][0]
    assert (image["width"], image["height"], image["parents"]) == (96, 64, [source])
    meta = await read_meta(client, image["image_id"])
    recipe = meta["recipe"]
    assert recipe["tool"] == "inpaint" and recipe["strength"] == 0.8 and recipe["parents"] == [source]
    assert recipe["mask"] == {"boxes": [[0.5, 0, 0.5, 0.5], [8, 40, 32, 24]]}
    rerun = meta["rerun"]
    assert rerun["name"] == "inpaint" and rerun["arguments"]["boxes"] == recipe["mask"]["boxes"]
    again = ids_of(await call(client, "inpaint", rerun["arguments"]))[0]
    assert await read_png(client, again) == await read_png(client, image["image_id"])
    # a lower strength changes less: another picture from the same seed
    weaker = ids_of(await call(client, "inpaint", {**args, "strength": 0.3}))[0]
    assert await read_png(client, weaker) != await read_png(client, again)


async def test_inpaint_with_a_mask_file_and_a_reference(client: Client, input_dir: Path) -> None:
    source, reference, mask = input_dir / "src.png", input_dir / "ref.png", input_dir / "mask.png"
    Image.new("RGB", (150, 100), (40, 90, 160)).save(source)
    Image.new("RGB", (80, 80), (200, 30, 30)).save(reference)
    drawn = Image.new("L", (300, 200), 0)
    ImageDraw.Draw(drawn).ellipse((60, 40, 220, 180), fill=255)
    drawn.save(mask)
    args = {"image": str(source), "prompt": "a red ball like image 2", "mask": str(mask), "seed": 2}
    result = await call(client, "inpaint", {**args, "references": [str(reference)]})
    image = result.structured_content["images"][0]
    assert (image["width"], image["height"]) == (144, 96)  # resized to whole tokens, as the reference does
    meta = await read_meta(client, image["image_id"])
    parents = meta["recipe"]["parents"]
    assert len(parents) == 2 and parents == image["parents"]
    mask_id = meta["recipe"]["mask"]["image"]
    assert mask_id not in parents
    stored_mask = Image.open(io.BytesIO(await read_png(client, mask_id)))
    assert stored_mask.size == (144, 96) and stored_mask.convert("L").getextrema() == (0, 255)
    again = ids_of(await call(client, "inpaint", meta["rerun"]["arguments"]))[0]
    assert await read_png(client, again) == await read_png(client, image["image_id"])


async def test_pictures_whose_token_floor_changes_their_aspect(client: Client, input_dir: Path) -> None:
    """333x517 -> 320x512, 100x70 -> 96x64, ...: 3-8% off the aspect, as diffusers inpaints them; by boxes and
    by a mask drawn at the picture's own size. A mask of truly another shape is still refused."""
    floored = {(333, 517): (320, 512), (100, 70): (96, 64), (200, 130): (192, 128), (90, 70): (80, 64)}
    for (w, h), output in floored.items():
        source, mask = input_dir / f"src-{w}x{h}.png", input_dir / f"mask-{w}x{h}.png"
        Image.new("RGB", (w, h), (40, 90, 160)).save(source)
        drawn = Image.new("L", (w, h), 0)
        drawn.paste(255, (0, 0, w // 2, h // 2))
        drawn.save(mask)
        base = {"image": str(source), "prompt": "a window", "steps": 1, "seed": 1}
        for region in ({"boxes": [[0, 0, 0.5, 0.5]]}, {"mask": str(mask)}):
            result = await call(client, "inpaint", {**base, **region})
            image = result.structured_content["images"][0]
            assert (image["width"], image["height"]) == output, (w, h, region)
    square = data_uri(png(Image.new("L", (100, 100), 255)))
    refused = await client.call_tool("inpaint", {"image": str(source), "prompt": "x", "mask": square})
    assert refused.is_error and "the mask is 100x100 but the image is 90x70" in refused.content[0].text


async def test_bad_inpaint_inputs_are_tool_errors_and_reach_no_model(
    client: Client, server_state: Any, tiny_spy: Any, input_dir: Path
) -> None:
    source = input_dir / "src.png"
    Image.new("RGB", (128, 64), (40, 90, 160)).save(source)
    square = data_uri(png(Image.new("L", (64, 64), 255)))
    black = data_uri(png(Image.new("L", (256, 128), 0)))
    thin = Image.new("L", (128, 64), 0)
    thin.paste(255, (0, 0, 128, 5))
    p, img = "a window", str(source)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("neither", {"image": img, "prompt": p}, "no mask and no boxes given"),
        ("both", {"image": img, "prompt": p, "mask": square, "boxes": [[0, 0, 10, 10]]}, "not both"),
        ("strength 0", {"image": img, "prompt": p, "boxes": [[0, 0, 10, 10]], "strength": 0}, "strength"),
        ("strength 1.5", {"image": img, "prompt": p, "boxes": [[0, 0, 10, 10]], "strength": 1.5}, "strength"),
        ("box of three", {"image": img, "prompt": p, "boxes": [[0, 0, 10]]}, "box 1 has 3 numbers"),
        (
            "box outside",
            {"image": img, "prompt": p, "boxes": [[200, 0, 10, 10]]},
            "lies outside the 128x64 image",
        ),
        ("empty box", {"image": img, "prompt": p, "boxes": [[10, 10, 0, 10]]}, "not a region"),
        ("other aspect", {"image": img, "prompt": p, "mask": square}, "aspect ratios differ"),
        ("empty mask", {"image": img, "prompt": p, "mask": black}, "repaints nothing"),
        ("thin mask", {"image": img, "prompt": p, "mask": data_uri(png(thin))}, "too thin"),
        ("bad mask", {"image": img, "prompt": p, "mask": str(input_dir / "none.png")}, "mask: "),
        (
            "width",
            {"image": img, "prompt": p, "boxes": [[0, 0, 10, 10]], "width": 64},
            "unknown argument 'width'",
        ),
        (
            "too many references",
            {"image": img, "prompt": p, "boxes": [[0, 0, 10, 10]], "references": [img] * 4},
            "references",
        ),
    ]
    wrong = []
    for name, args, expected in cases:
        result = await client.call_tool("inpaint", args)
        text = result.content[0].text
        if not (result.is_error and expected in text):
            wrong.append(f"{name}: {text[:300]}")
    assert wrong == []
    assert tiny_spy.calls == [] and server_state.store.stats().count == 0
    assert not (await client.call_tool("server_status", {})).is_error
