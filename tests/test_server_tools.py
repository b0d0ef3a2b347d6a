"""The tools, resources and results through a real in-process MCP client (2026 and 2025 eras), on the tiny model."""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from PIL import Image

from klein_agent.server.app import build_server
from tests.fakes import data_uri, png_bytes

pytestmark = pytest.mark.anyio

SNAPSHOT = Path(__file__).parent / "snapshots" / "server_tools.json"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def call(client: Client, tool: str, args: dict[str, Any], **kw: Any) -> Any:
    result = await client.call_tool(tool, args, **kw)
    assert not result.is_error, result.content[0].text if result.content else result
    return result


async def read_png(client: Client, image_id: str) -> bytes:
    contents = (await client.read_resource(f"image://{image_id}")).contents
    assert len(contents) == 1 and contents[0].mime_type == "image/png"
    return base64.b64decode(contents[0].blob)  # type: ignore[union-attr]


async def read_meta(client: Client, image_id: str) -> dict[str, Any]:
    contents = (await client.read_resource(f"image://{image_id}/meta")).contents
    assert contents[0].mime_type == "application/json"
    return json.loads(contents[0].text)  # type: ignore[union-attr]


def ids_of(result: Any) -> list[str]:
    return [img["image_id"] for img in result.structured_content["images"]]


async def test_generate_returns_preview_summary_links_and_structured_content(client: Client) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    result = await call(
        client,
        "generate",
        {"prompt": "a red cube on a table", "width": 64, "height": 96, "seed": 7, "num_images": 2},
        progress_callback=on_progress,
    )
    at_return = len(progress)
    assert [block.type for block in result.content] == ["image", "text", "resource_link", "resource_link"]
    image, text = result.content[0], result.content[1]
    raw = base64.b64decode(image.data)
    assert image.mime_type in ("image/webp", "image/jpeg")
    assert raw[:4] == b"RIFF" if image.mime_type == "image/webp" else raw[:3] == b"\xff\xd8\xff"
    assert len(image.data) <= 700_000 and max(Image.open(io.BytesIO(raw)).size) <= 1024

    structured = result.structured_content
    assert set(structured) >= {"images", "elapsed_ms"}
    assert [(i["seed"], i["width"], i["height"], i["parents"]) for i in structured["images"]] == [
        (7, 64, 96, []),
        (8, 64, 96, []),
    ]
    assert len(json.dumps(structured)) < 2000, "no image bytes in structured content"
    ids = ids_of(result)
    for image_id in ids:
        assert image_id in text.text
    assert "seeds 7-8" in text.text and "view_image" in text.text
    # the how-to is said once, in the descriptions, not repeated in every result of a loop
    assert len(text.text.splitlines()[-1]) < 100 and "note" not in structured
    compose = next(t for t in (await client.list_tools()).tools if t.name == "compose")
    assert '"image 1"' in (compose.description or "")
    assert [link.uri for link in result.content[2:]] == [f"image://{i}" for i in ids]

    values = [p[0] for p in progress]
    assert values == sorted(values) and len(set(values)) == len(values), "progress rises strictly"
    assert any(m and m.endswith("step 4/4") for _, _, m in progress)
    await anyio.sleep(0.1)
    assert len(progress) == at_return, "no progress notification after the result"


async def test_image_resources_give_the_png_and_the_recipe(client: Client) -> None:
    result = await call(client, "generate", {"prompt": "a blue sphere", "width": 64, "height": 64, "seed": 3})
    (image_id,) = ids_of(result)
    png = await read_png(client, image_id)
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    meta = await read_meta(client, image_id)
    recipe = meta["recipe"]
    assert recipe["tool"] == "generate" and recipe["prompt"] == "a blue sphere" and recipe["seed"] == 3
    assert recipe["steps"] == 4 and recipe["model"] == "tiny" and recipe["parents"] == []
    assert {"timings_ms", "created_at", "guidance", "width", "height"} <= set(recipe)
    assert meta["rerun"] == {  # MCP's spelling of a tools/call: name and arguments
        "name": "generate",
        "arguments": {
            "prompt": "a blue sphere",
            "width": 64,
            "height": 64,
            "seed": 3,
            "steps": 4,
            "guidance": recipe["guidance"],
        },
    }
    with pytest.raises(MCPError, match="Unknown image id"):
        await client.read_resource("image://img_AAAAAAAAAAAAAAAAAAAAAA")
    templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    assert templates == {"image://{image_id}", "image://{image_id}/meta"}


async def test_a_stored_recipe_regenerates_identical_png_bytes(client: Client) -> None:
    first = await call(
        client,
        "generate",
        {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "seed": 11, "num_images": 2},
    )
    second_id = ids_of(first)[1]  # image k of a batch is the single run with seed + k
    edited = await call(
        client, "edit", {"image": second_id, "prompt": "the lighthouse painted red", "seed": 5}
    )
    edits = await call(
        client,
        "edit",
        {"image": second_id, "prompt": "at night", "seed": 30, "num_images": 2, "width": 128, "height": 64},
    )
    for image_id in (second_id, ids_of(edited)[0], ids_of(edits)[1]):
        rerun = (await read_meta(client, image_id))["rerun"]
        again = await call(client, rerun["name"], rerun["arguments"])
        assert ids_of(again)[0] != image_id
        assert await read_png(client, ids_of(again)[0]) == await read_png(client, image_id)


async def test_edit_matches_the_input_size_and_records_lineage(client: Client) -> None:
    base = await call(client, "generate", {"prompt": "a green field", "width": 96, "height": 64, "seed": 1})
    (base_id,) = ids_of(base)
    edited = await call(
        client, "edit", {"image": f"image://{base_id}", "prompt": "a yellow field", "session": "s1"}
    )
    info = edited.structured_content["images"][0]
    assert (info["width"], info["height"], info["parents"]) == (96, 64, [base_id])
    assert f"image 1 = {base_id}" in edited.content[1].text
    listed = await call(client, "list_images", {"session": "s1"})
    assert [(i["image_id"], i["parents"], i["tool"]) for i in listed.structured_content["images"]] == [
        (info["image_id"], [base_id], "edit")
    ]


async def test_path_and_data_uri_inputs_are_imported_into_the_store_first(
    client: Client, input_dir: Path
) -> None:
    path = input_dir / "photo.png"
    path.write_bytes(png_bytes(100, 70))
    edited = await call(client, "edit", {"image": str(path), "prompt": "make it blue", "seed": 2})
    info = edited.structured_content["images"][0]
    assert (info["width"], info["height"]) == (96, 64), "matched to the input, rounded to multiples of 16"
    (imported,) = info["parents"]
    meta = await read_meta(client, imported)
    assert meta["recipe"]["tool"] == "import" and meta["recipe"]["source"] == "path"
    assert meta["rerun"] is None
    # stored as the model used it: about 1 Mpx at most, whole tokens (a rerun from it gives the same pixels)
    assert Image.open(io.BytesIO(await read_png(client, imported))).size == (96, 64)

    jpeg = data_uri(png_bytes(64, 128, fmt="JPEG"), "image/jpeg")
    webp = data_uri(png_bytes(128, 64, fmt="WEBP"), "image/webp")
    composed = await call(
        client, "compose", {"images": [jpeg, webp], "prompt": "the object from image 1 in image 2", "seed": 4}
    )
    info = composed.structured_content["images"][0]
    assert (info["width"], info["height"]) == (64, 128), "compose matches image 1"
    sources = [(await read_meta(client, p))["recipe"]["source"] for p in info["parents"]]
    assert sources == ["data_uri", "data_uri"]

    # the same bytes sent again are the same stored input, not another copy
    again = await call(client, "edit", {"image": jpeg, "prompt": "again", "seed": 5})
    assert again.structured_content["images"][0]["parents"] == info["parents"][:1]


async def test_compose_keeps_reference_order_and_a_retry_hits_the_caches(client: Client) -> None:
    a = ids_of(await call(client, "generate", {"prompt": "a cat", "width": 64, "height": 64, "seed": 1}))[0]
    b = ids_of(await call(client, "generate", {"prompt": "a sofa", "width": 64, "height": 64, "seed": 2}))[0]
    args = {"images": [b, a], "prompt": "the cat from image 2 on the sofa from image 1", "seed": 9}
    first = await call(client, "compose", args)
    assert first.structured_content["images"][0]["parents"] == [b, a]
    retry = await call(client, "compose", {**args, "seed": 10})
    assert retry.structured_content["cache_hits"] == {"prompt": 1, "references": 2}
    assert "Reused from earlier calls" in retry.content[1].text
    status = await call(client, "server_status", {})
    assert status.structured_content["queue"]["cache_hits"]["references"] >= 2


async def test_list_images_pages_newest_first(client: Client) -> None:
    made = []
    for k in range(3):
        result = await call(
            client,
            "generate",
            {"prompt": f"picture {k}", "width": 64, "height": 64, "seed": k, "session": "pages"},
        )
        made += ids_of(result)
    page1 = await call(client, "list_images", {"session": "pages", "limit": 2})
    cursor = page1.structured_content["next_cursor"]
    assert [i["image_id"] for i in page1.structured_content["images"]] == [made[2], made[1]]
    assert cursor and cursor in page1.content[0].text
    page2 = await call(client, "list_images", {"session": "pages", "limit": 2, "cursor": cursor})
    assert [i["image_id"] for i in page2.structured_content["images"]] == [made[0]]
    assert page2.structured_content["next_cursor"] is None
    item = page2.structured_content["images"][0]
    assert (item["prompt"], item["seed"], item["tool"]) == ("picture 0", 0, "generate")
    empty = await call(client, "list_images", {"session": "nothing here"})
    assert empty.structured_content == {"images": [], "next_cursor": None}


async def test_view_image_shows_one_image_or_a_labelled_sheet(client: Client) -> None:
    result = await call(
        client, "generate", {"prompt": "stripes", "width": 128, "height": 64, "num_images": 3}
    )
    ids = ids_of(result)
    one = await call(client, "view_image", {"image_ids": ids[0], "max_edge": 64})
    assert [b.type for b in one.content] == ["image", "text"]
    assert one.structured_content["preview_width"] == 64 and one.structured_content["preview_height"] == 32
    sheet = await call(client, "view_image", {"image_ids": ids})
    assert [i["image_id"] for i in sheet.structured_content["images"]] == ids
    assert all(f"{k} = {i}" in sheet.content[1].text for k, i in enumerate(ids, start=1))
    assert len(sheet.content[0].data) <= 700_000
    # what an agent often sends: several ids in one string
    joined = await call(client, "view_image", {"image_ids": f"{ids[0]}, {ids[2]}"})
    assert [i["image_id"] for i in joined.structured_content["images"]] == [ids[0], ids[2]]


async def test_export_image_writes_the_full_png_inside_allowed_folders(
    client: Client, input_dir: Path
) -> None:
    (image_id,) = ids_of(await call(client, "generate", {"prompt": "a boat", "width": 64, "height": 64}))
    result = await call(client, "export_image", {"image_id": image_id, "path": str(input_dir)})
    written = Path(result.structured_content["path"])
    assert written == input_dir / f"{image_id}.png"
    assert written.read_bytes() == await read_png(client, image_id)
    assert result.structured_content["file_uri"].startswith("file://")
    again = await client.call_tool("export_image", {"image_id": image_id, "path": str(written)})
    assert again.is_error and "overwrite" in again.content[0].text
    await call(client, "export_image", {"image_id": image_id, "path": str(written), "overwrite": True})
    assert [p.name for p in input_dir.iterdir()] == [written.name], "no temp files left"


async def test_server_status_reports_model_queue_and_store(client: Client, server_state: Any) -> None:
    await call(client, "generate", {"prompt": "x", "width": 64, "height": 64})
    status = (await call(client, "server_status", {})).structured_content
    assert status["model"]["state"] == "ready" and status["model"]["model"] == "tiny"
    assert status["model"]["device"] == "cpu" and status["model"]["dtype"] == "float32"
    assert status["queue"]["queued"] == 0 and status["queue"]["completed"] >= 1
    assert status["store"]["images"] == 1 and status["store"]["root"] == str(server_state.store.root)
    root = str(server_state.store.root)
    assert status["gallery_command"] == shlex.join(["klein-agent", "gallery", "--store", root, "--open"])
    assert status["gallery_command"] in (await call(client, "server_status", {})).content[0].text


def tool_listing(tools: Any) -> list[dict[str, Any]]:
    return [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools.tools]


async def test_tools_list_matches_the_snapshot(client: Client) -> None:
    listing = tool_listing(await client.list_tools())
    assert [t["name"] for t in listing] == [
        "generate",
        "edit",
        "compose",
        "inpaint",
        "list_images",
        "view_image",
        "export_image",
        "server_status",
        "compare_images",
        "record_verdict",
    ]
    for tool in listing:
        hints = tool["annotations"]
        assert {"title", "readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"} <= set(hints)
        assert "outputSchema" in tool
    hints = {t["name"]: t["annotations"] for t in listing}
    assert not hints["generate"]["readOnlyHint"] and hints["list_images"]["readOnlyHint"]
    assert hints["export_image"]["destructiveHint"] and not hints["edit"]["openWorldHint"]
    assert hints["compare_images"]["readOnlyHint"] and not hints["record_verdict"]["readOnlyHint"]
    width = listing[0]["inputSchema"]["properties"]["width"]
    assert width["type"] == "integer"  # not anyOf: see test_optional_scalars_are_published_as_their_type
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 2048, 16)
    assert width["default"] is None  # omitted: the shared size rule decides
    if os.environ.get("KLEIN_AGENT_UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(listing, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    expected = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert listing == expected, (
        "tools/list changed: review it, then rerun with KLEIN_AGENT_UPDATE_SNAPSHOTS=1"
    )


async def test_url_inputs_make_edit_and_compose_open_world(
    tiny_spy: Any, tmp_path: Path, input_dir: Path
) -> None:
    from tests.conftest import make_server_state

    state = make_server_state(lambda: tiny_spy, tmp_path / "s", input_dir, allow_urls=True)
    try:
        async with Client(build_server(state)) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert tools["edit"].annotations.open_world_hint and tools["compose"].annotations.open_world_hint
            assert tools["inpaint"].annotations.open_world_hint
            assert not tools["generate"].annotations.open_world_hint
            assert "http(s) URL" in (tools["edit"].description or "")
    finally:
        state.engine.close()
        state.store.close()


SCALARS = {"integer", "number", "string", "boolean"}


def schema_nodes(schema: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema object in a JSON schema tree (properties, items, $defs, anyOf branches...), with its path."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(schema, dict):
        found.append((where, schema))
        for key, value in schema.items():
            found += schema_nodes(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for k, value in enumerate(schema):
            found += schema_nodes(value, f"{where}[{k}]")
    return found


async def test_optional_scalars_are_published_as_their_type(client: Client) -> None:
    """MCP Inspector 0.15 converts a typed argument only when `schema.type === "integer"` (or "number"): under
    `anyOf: [integer, null]`, and under `["integer", "null"]` too, `width=256` went out as the string "256" and was
    refused. Walk every tool's whole input schema: no optional scalar is left as anyOf with null, and each
    optional integer or number is published as its type with a default."""
    left: list[str] = []
    checked: set[tuple[str, str]] = set()
    for tool in (await client.list_tools()).tools:
        for where, node in schema_nodes(tool.input_schema, tool.name):
            options = node.get("anyOf", [])
            scalars = [o for o in options if o.get("type") in SCALARS]
            if len(options) == 2 and {"type": "null"} in options and scalars:
                left.append(f"{where}: anyOf {options}")
            if node.get("type") != "object":
                continue
            for name, prop in node.get("properties", {}).items():
                kinds = prop.get("type")
                branches = {o.get("type") for o in prop.get("anyOf", [])}
                if name in node.get("required", []) or not (
                    {"integer", "number"} & {*branches, *_listed(kinds)}
                ):
                    continue
                checked.add((tool.name, name))
                if not (kinds in ("integer", "number") and "default" in prop):
                    left.append(f"{where}/properties/{name}: {prop}")
    assert left == []
    # the walk saw the numbers it is about, the nested LoRA scale included
    numbers = {"width", "height", "seed", "steps", "guidance", "num_images", "scale"}
    assert {("generate", n) for n in numbers} | {("inpaint", "strength")} <= checked


def _listed(kinds: Any) -> list[str]:
    return [kinds] if isinstance(kinds, str) else list(kinds or [])


async def test_the_argument_checks_take_exactly_the_values_they_took(
    client: Client, server_state: Any
) -> None:
    """The published schemas differ from the SDK's only in spelling and in listing null for an optional scalar (its
    default, so omitting it is the advertised way); the argument checks still validate against the SDK's schema,
    so an explicit null works as before, through a real client."""
    import jsonschema
    from mcp.server import MCPServer

    server = build_server(server_state)
    published = {t.name: t.input_schema for t in await server.list_tools()}
    original = {t.name: t.input_schema for t in await MCPServer.list_tools(server)}
    assert published != original  # there was something to rewrite
    values: list[Any] = [None, 0, 1, -1, 16, 64, 65, 256, 2048, 2064, 4294967295, 4294967296, 0.5, 1.5, 64.0, -4.0,
        4.5, 20.0, 21.0, "", "x", "256", "a" * 65, True, False, [], [1], ["a"], [[0, 0, 1, 1]], {}, {"name": "s"},
        {"name": "s", "scale": None}, {"name": "s", "scale": 9}, [{"name": "s", "scale": 0.5}]]  # fmt: skip
    valid = {
        "prompt": "x",
        "image": "img_a",
        "images": ["img_a"],
        "image_id": "img_a",
        "image_ids": ["img_a"],
        "a": "img_a",  # compare_images
        "b": "img_a",
        "verdict": "pick",  # record_verdict
    }
    valid["path"] = "/tmp/a.png"
    differ = set()
    for name, schema in published.items():
        base = {
            key: valid[key] for key in schema.get("required", [])
        }  # each value alone, beside valid required ones
        assert jsonschema.Draft202012Validator(original[name]).is_valid(base)
        for argument in schema.get("properties", {}):
            for value in values:
                before = jsonschema.Draft202012Validator(original[name]).is_valid({**base, argument: value})
                after = jsonschema.Draft202012Validator(schema).is_valid({**base, argument: value})
                if before != after:
                    assert (before, value) == (True, None), (name, argument, value)
                    differ.add((name, argument))
    assert ("generate", "width") in differ and ("inpaint", "strength") in differ
    nulls = {"width": None, "height": None, "seed": None, "steps": None, "guidance": None, "session": None}
    made = await call(client, "generate", {"prompt": "x", **nulls, "width": 64, "height": 64})
    assert made.structured_content["images"][0]["width"] == 64
    lora_null = {
        "loras": [{"name": "nothing-loaded", "scale": None}]
    }  # the nested null passes the checks too
    refused = await client.call_tool("generate", {"prompt": "x", "width": 64, "height": 64, **lora_null})
    assert refused.is_error and "no LoRA adapter named 'nothing-loaded'" in refused.content[0].text
