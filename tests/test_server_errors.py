"""Every bad input of spec point 6, through a real client: a tool error that names the problem and the fix.

For each, the model is never called (the spy counts calls), nothing is written to the store, and the server
keeps answering. Decoding bombs and other hostile files are built at test time, never checked in.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.fakes import data_uri, png_bytes

pytestmark = pytest.mark.anyio

VALID_UNKNOWN_ID = "img_" + "A" * 22


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with one tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def gif_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="GIF")
    return buf.getvalue()


def cases(input_dir: Path, outside: Path) -> list[tuple[str, str, dict[str, Any], str]]:
    """(case id, tool, arguments, text the error must contain)."""
    (input_dir / "notes.png").write_text("this is not an image")
    (outside / "secret.png").write_bytes(png_bytes())
    evil = input_dir.parent / (input_dir.name + "_evil")  # a sibling whose name starts with the allowed one
    evil.mkdir()
    (evil / "x.png").write_bytes(png_bytes())
    os.symlink(outside / "secret.png", input_dir / "link.png")
    os.symlink(outside, input_dir / "linkdir")
    good = str(input_dir / "good.png")
    Path(good).write_bytes(png_bytes())
    truncated = png_bytes(128, 128)[:200]
    big = data_uri(os.urandom(3 * 1024**2))  # the test policy allows 2 MiB of image data
    p = "make it blue"
    return [
        ("unknown id", "edit", {"image": VALID_UNKNOWN_ID, "prompt": p}, "Call list_images"),
        ("unknown image uri", "edit", {"image": f"image://{VALID_UNKNOWN_ID}", "prompt": p}, "list_images"),
        ("malformed id", "edit", {"image": "img_short", "prompt": p}, "'img_short' is not a valid image id"),
        # with a '/' or '.' it is a path (rules/image_refs.py), and the path rule refuses the traversal
        (
            "traversal",
            "edit",
            {"image": "img_../../etc/passwd", "prompt": p},
            "contains '..': give the absolute",
        ),
        (
            "unknown id in compose",
            "compose",
            {"images": [good, VALID_UNKNOWN_ID], "prompt": p},
            "image 2: Unknown",
        ),
        (
            "outside allowed folders",
            "edit",
            {"image": str(outside / "secret.png"), "prompt": p},
            "--allow-dir",
        ),
        (
            "dot-dot escape",
            "edit",
            {"image": f"{input_dir}/../outside/secret.png", "prompt": p},
            "contains '..'",
        ),
        (
            "symlink escape",
            "edit",
            {"image": str(input_dir / "link.png"), "prompt": p},
            "outside the folders",
        ),
        (
            "symlinked folder",
            "edit",
            {"image": str(input_dir / "linkdir" / "secret.png"), "prompt": p},
            "outside",
        ),
        ("sibling prefix", "edit", {"image": str(evil / "x.png"), "prompt": p}, "outside the folders"),
        ("relative path", "edit", {"image": "inputs/good.png", "prompt": p}, "relative path"),
        ("missing file", "edit", {"image": str(input_dir / "nope.png"), "prompt": p}, "does not exist"),
        (
            "not an image",
            "edit",
            {"image": str(input_dir / "notes.png"), "prompt": p},
            "not a PNG, JPEG or WebP",
        ),
        ("undecodable data", "edit", {"image": data_uri(truncated), "prompt": p}, "truncated or corrupt"),
        ("bad base64", "edit", {"image": "data:image/png;base64,@@@not base64@@@", "prompt": p}, "base64"),
        (
            "decompression bomb",
            "edit",
            {"image": data_uri(png_header_only(65535, 65535)), "prompt": p},
            "Mpx",
        ),
        ("unsupported format", "edit", {"image": data_uri(gif_bytes(), "image/gif"), "prompt": p}, "PNG"),
        ("svg data uri", "edit", {"image": data_uri(b"<svg/>", "image/svg+xml"), "prompt": p}, "PNG"),
        ("tiny image", "edit", {"image": data_uri(png_bytes(32, 32)), "prompt": p}, "at least 64 px"),
        ("oversized payload", "edit", {"image": big, "prompt": p}, "MiB limit"),
        ("url not enabled", "edit", {"image": "https://example.com/cat.png", "prompt": p}, "--allow-urls"),
        ("width not multiple of 16", "generate", {"prompt": p, "width": 100}, "multiple of 16"),
        (
            "width too large",
            "generate",
            {"prompt": p, "width": 4096},
            "width must be a multiple of 16 from 64 to 2048, got 4096",
        ),
        (
            "height too small",
            "generate",
            {"prompt": p, "height": 32},
            "height must be a multiple of 16 from 64 to 2048, got 32",
        ),
        ("negative size", "generate", {"prompt": p, "width": -16}, "width must be a multiple of 16 from 64"),
        ("edit size", "edit", {"image": good, "prompt": p, "width": 72}, "multiple of 16"),
        (
            "pixel cap",
            "generate",
            {"prompt": p, "width": 2048, "height": 2048, "num_images": 4},
            "megapixel limit",
        ),
        ("empty prompt", "generate", {"prompt": ""}, "the prompt is empty"),
        ("blank prompt", "generate", {"prompt": "  \n\t "}, "prompt is empty"),
        ("control-only prompt", "generate", {"prompt": "\x00\x1b"}, "prompt is empty"),
        ("prompt too long", "generate", {"prompt": "x" * 2001}, "over the 2000 limit"),
        (
            "too many images",
            "generate",
            {"prompt": p, "num_images": 5},
            "num_images must be from 1 to 4, got 5",
        ),
        (
            "too many references",
            "compose",
            {"images": [good] * 5, "prompt": p},
            "but this model takes at most 4",
        ),
        (  # over the schema's bound (the most any family takes): still the loaded model's sentence, as the CLI's
            "more references than any model takes",
            "compose",
            {"images": [good] * 11, "prompt": p},
            "11 reference images given, but this model takes at most 4: pass fewer images",
        ),
        ("no references", "compose", {"images": [], "prompt": p}, "at least 1 item"),
        ("bad steps", "generate", {"prompt": p, "steps": 0}, "steps must be from 1 to 100, got 0"),
        (
            "bad seed",
            "generate",
            {"prompt": p, "seed": -1},
            "seed must be an integer from 0 to 4294967295, got -1",
        ),
        (
            "batch past the largest seed",
            "generate",
            {"prompt": p, "seed": 4294967295, "num_images": 2},
            "use a seed of at most 4294967294",
        ),
        (
            "guidance below 1",
            "generate",
            {"prompt": p, "guidance": 0.5},
            "guidance must be from 1 (no guidance) to 20, got 0.5",
        ),
        (
            "unknown argument",
            "generate",
            {"prompt": p, "negative_prompt": "blurry"},
            "unknown argument 'negative_prompt'; this tool takes prompt, caption, layout, width, height, seed",
        ),
        (
            "integer as a string",
            "generate",
            {"prompt": p, "width": "64"},
            'width must be an integer, not a string ("64")',
        ),
        (
            "boolean as a string",
            "export_image",
            {"image_id": VALID_UNKNOWN_ID, "path": str(input_dir), "overwrite": "yes"},
            'overwrite must be true or false, not a string ("yes")',
        ),
        ("bad session", "generate", {"prompt": p, "session": "a/b"}, "not a valid label"),
        ("view unknown", "view_image", {"image_ids": [VALID_UNKNOWN_ID]}, "Unknown image id"),
        ("view too many", "view_image", {"image_ids": [VALID_UNKNOWN_ID] * 17}, "at most 16"),
        (
            "export unknown",
            "export_image",
            {"image_id": VALID_UNKNOWN_ID, "path": str(input_dir)},
            "Unknown image",
        ),
        ("bad cursor", "list_images", {"cursor": "garbage!"}, "Invalid cursor"),
    ]


async def test_every_bad_input_is_a_tool_error_and_reaches_no_model(
    client: Client, server_state: Any, tiny_spy: Any, input_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    wrong = []
    for name, tool, args, expected in cases(input_dir, outside):
        result = await client.call_tool(tool, args)
        text = result.content[0].text
        if not (result.is_error and expected in text and text.startswith(f"Error executing tool {tool}")):
            wrong.append(f"{name}: {text[:300]}")
    assert wrong == []
    assert tiny_spy.calls == [], "validation stops bad calls before the model"
    assert server_state.store.stats().count == 0, "nothing was imported or stored"
    store_files = list((server_state.store.root / "images").iterdir())
    assert store_files == [], "no half-written files"
    ok = await client.call_tool("generate", {"prompt": "still serving", "width": 64, "height": 64})
    assert not ok.is_error


async def test_export_outside_allowed_folders_is_refused(
    client: Client, tmp_path: Path, input_dir: Path
) -> None:
    made = await client.call_tool("generate", {"prompt": "a kite", "width": 64, "height": 64})
    image_id = made.structured_content["images"][0]["image_id"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, input_dir / "escape")
    for path, expected in [
        (str(outside / "x.png"), "outside the folders"),
        (str(input_dir / "escape" / "x.png"), "outside the folders"),
        (f"{input_dir}/../elsewhere/x.png", "contains '..'"),
        ("relative.png", "relative path"),
        (str(input_dir / "x.jpg"), "end the file name with .png"),
        (str(input_dir / "missing" / "x.png"), "does not exist"),
    ]:
        result = await client.call_tool("export_image", {"image_id": image_id, "path": path})
        assert result.is_error and expected in result.content[0].text, (path, result.content[0].text)
    assert list(outside.iterdir()) == []


async def test_prompt_with_unknown_image_is_a_clear_protocol_error(client: Client) -> None:
    with pytest.raises(MCPError, match="Unknown image id"):
        await client.get_prompt("compare_images", {"image_ids": VALID_UNKNOWN_ID})


async def test_a_store_write_failure_is_reported_and_leaves_nothing(
    client: Client, server_state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import klein_agent.service.files as store_module  # the store's blob writes fsync here

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", disk_full)
    result = await client.call_tool("generate", {"prompt": "a kite", "width": 64, "height": 64})
    assert result.is_error and "No space left on device" in result.content[0].text
    monkeypatch.undo()
    assert server_state.store.stats().count == 0
    assert list((server_state.store.root / "images").iterdir()) == []
    assert not (await client.call_tool("generate", {"prompt": "a kite", "width": 64, "height": 64})).is_error


async def test_non_finite_pictures_are_an_error_and_nothing_is_stored(
    tmp_path: Path, input_dir: Path
) -> None:
    import torch

    from klein_agent.pipeline import load_pipeline
    from klein_agent.server.app import build_server
    from tests.conftest import make_server_state

    broken = load_pipeline("tiny")
    with torch.no_grad():
        broken.transformer.final_layer.linear.weight.fill_(float("nan"))
    state = make_server_state(lambda: broken, tmp_path / "store", input_dir)
    try:
        async with Client(build_server(state), mode="auto") as client:
            result = await client.call_tool("generate", {"prompt": "a kite", "width": 64, "height": 64})
            text = result.content[0].text
            assert result.is_error and "non-finite values (NaN or infinity) in the latents" in text
            assert "nothing was stored" in text and "--dtype float32" in text
            assert state.store.stats().count == 0
            assert not (await client.call_tool("server_status", {})).is_error
    finally:
        state.engine.close()
        state.store.close()


@pytest.mark.parametrize("how", ["--store", "KLEIN_AGENT_STORE"])
def test_a_store_that_cannot_open_names_the_setting_that_chose_it(tmp_path: Path, how: str) -> None:
    in_the_way = tmp_path / "store"
    in_the_way.write_text("not a folder")
    argv = [sys.executable, "-m", "klein_agent", "serve", "--model", "tiny"]
    env = {**os.environ, "KLEIN_AGENT_STORE": ""}
    if how == "--store":
        argv += ["--store", str(in_the_way)]
    else:
        env["KLEIN_AGENT_STORE"] = str(in_the_way)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stdout == ""
    assert f"{in_the_way} is a file, not a folder" in done.stderr
    named = "given with --store" if how == "--store" else "$KLEIN_AGENT_STORE names"
    assert named in done.stderr and "Traceback" not in done.stderr
    assert in_the_way.read_text() == "not a folder"


async def test_prompt_errors_are_invalid_params(client: Client) -> None:
    """Both protocol eras (the `client` fixture): a missing required argument, an unknown prompt and an unknown
    argument are -32602 with a message that names the fix, never code 0 or "Internal server error"."""
    from mcp_types import INVALID_PARAMS

    for name, arguments, expected in [
        ("iterate_image", {}, "prompt iterate_image needs the argument goal"),
        ("iterate_image", {"goal": "  "}, "needs the argument goal"),
        ("no_such_prompt", {"goal": "x"}, "unknown prompt 'no_such_prompt'; the prompts are compare_images"),
        ("iterate_image", {"goal": "x", "colour": "red"}, "has no argument colour; it takes"),
    ]:
        with pytest.raises(MCPError) as caught:
            await client.get_prompt(name, arguments)
        assert caught.value.error.code == INVALID_PARAMS, (name, arguments, caught.value.error)
        assert expected in caught.value.error.message
    assert (await client.get_prompt("iterate_image", {"goal": "x"})).messages  # still serving


async def test_a_cursor_number_sqlite_cannot_hold_is_a_tool_error(client: Client) -> None:
    import base64
    import json

    huge = {"v": 1, "before": 99999999999999999999999, "session": None}
    cursor = base64.urlsafe_b64encode(json.dumps(huge).encode()).decode().rstrip("=")
    for bad in (cursor, "99999999999999999999999"):
        result = await client.call_tool("list_images", {"cursor": bad})
        assert result.is_error and "Invalid cursor" in result.content[0].text, result.content[0].text
        assert "Pass next_cursor from the previous list_images result unchanged" in result.content[0].text
    assert not (await client.call_tool("list_images", {})).is_error


async def test_one_damaged_recipe_row_does_not_break_list_images(
    client: Client, server_state: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    made = await client.call_tool(
        "generate", {"prompt": "a kite", "width": 64, "height": 64, "num_images": 3}
    )
    ids = [i["image_id"] for i in made.structured_content["images"]]
    database = server_state.store.root / "store.sqlite3"
    with sqlite3.connect(database) as db:  # a record edited by hand or hit by a disk error
        db.execute("UPDATE images SET recipe = ? WHERE image_id = ?", ('{"tool": "gener', ids[1]))
        db.execute("UPDATE images SET recipe = ?, parents = ? WHERE image_id = ?", ("[1, 2]", "{", ids[2]))
    caplog.set_level("WARNING", logger="klein_agent.service.store")
    listed = await client.call_tool("list_images", {})
    assert not listed.is_error, listed.content[0].text
    entries = {i["image_id"]: i for i in listed.structured_content["images"]}
    assert set(entries) == set(ids), "every image is listed, the damaged ones too"
    assert not entries[ids[0]]["recipe_unreadable"] and entries[ids[0]]["prompt"] == "a kite"
    for damaged in ids[1:]:
        entry = entries[damaged]
        assert entry["recipe_unreadable"] and entry["tool"] == "unknown" and entry["prompt"] is None
    assert entries[ids[2]]["parents"] == []
    assert listed.content[0].text.count("(recipe unreadable") == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"image {ids[1]}: the stored recipe is not valid JSON" in warned
    assert f"image {ids[2]}: the stored recipe is a list, not a JSON object" in warned
    meta = await client.read_resource(f"image://{ids[1]}/meta")
    assert '"unreadable"' in meta.contents[0].text  # type: ignore[union-attr]
    status = await client.call_tool("server_status", {})
    assert not status.is_error
