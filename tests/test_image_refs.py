"""One definition of an image reference (`klein_agent.rules.image_refs`): the scheme in any case, the id's case,
surrounding white space, `/meta`, a camera's relative `IMG_1234.JPG`, several ids in one string; and every reader
(view_image, export_image, edit's input dispatcher, compose's string of ids, the prompts, the CLI's --image) reads
a reference alike and refuses a bad one with the same sentence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from PIL import Image

from klein_agent.cli import main as cli_main
from klein_agent.rules.image_refs import (
    ImageRefError,
    is_image_id,
    looks_like_image_ref,
    parse_image_ref,
    require_image_id,
    split_image_refs,
)
from klein_agent.service.store import ImageStore
from klein_agent.service.store.records import new_image_id

pytestmark = pytest.mark.anyio

P = "a red cube"
TAIL = "Q2hlY2tzIGFyZSBjaGVhcA"  # 22 base64url characters, mixed case
ID = "img_" + TAIL


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ------------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    "text",
    [
        ID,
        f"image://{ID}",
        f"IMAGE://{ID}",
        f"Image://{ID}",
        f"  {ID}\n",
        f"\timage://{ID} ",
        f"IMAGE://{ID}\r\n",
    ],
)
def test_the_scheme_in_any_case_and_surrounding_space_name_the_same_id(text: str) -> None:
    assert parse_image_ref(text) == ID
    assert require_image_id(text) == ID


@pytest.mark.parametrize("wrong_case", ["IMG_" + TAIL, "Img_" + TAIL, "image://IMG_" + TAIL])
def test_the_id_is_case_sensitive_and_the_message_says_so(wrong_case: str) -> None:
    assert not is_image_id(wrong_case.removeprefix("image://"))
    with pytest.raises(ImageRefError, match=r"case matters \(img_ in lower case\)"):
        parse_image_ref(wrong_case)
    # The base64url tail keeps its case: lowering it would name another image.
    assert parse_image_ref(ID.lower()) != ID


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("img_short", "img_ followed by 22 letters"),
        ("img_" + TAIL + "x", "img_ followed by 22 letters"),
        ("img_ab cd", "img_ followed by 22 letters"),  # white space inside is not dropped
        ("image://", "not a valid image URI"),
        ("image:" + ID, "not a valid image URI"),  # the scheme without its //
        ("image://../etc/passwd", "not a valid image URI"),
        (f"image://{ID}/meta", f"metadata resource, not an image: pass image://{ID} or {ID}"),
    ],
)
def test_a_malformed_reference_is_refused_saying_what_an_id_is(text: str, says: str) -> None:
    with pytest.raises(ImageRefError) as e:
        parse_image_ref(text)
    assert says in str(e.value) and repr(text) in str(e.value)


@pytest.mark.parametrize(
    "text",
    ["IMG_1234.JPG", "img_0001.png", f"{ID}.png", "photos/IMG_1.jpg", "/abs/img_x", "data:image/png;x"],
)
def test_a_file_name_is_no_reference_whatever_its_case(text: str) -> None:
    assert not looks_like_image_ref(text)
    assert parse_image_ref(text) is None


def test_several_ids_in_one_string_in_order_and_the_bad_piece_named() -> None:
    other = new_image_id()
    assert split_image_refs(f"{ID}, IMAGE://{other};{ID}\n {other}") == [ID, other, ID, other]
    with pytest.raises(ImageRefError, match=r"'img_oops' is not a valid image id"):
        split_image_refs(f"{ID}, img_oops, {other}")


def test_the_store_mints_and_checks_exactly_the_ids_the_rule_reads() -> None:
    for _ in range(200):
        minted = new_image_id()
        assert is_image_id(minted) and ImageStore.is_valid_id(minted) and parse_image_ref(minted) == minted
    for text in ("img_short", "IMG_" + TAIL, "img_" + "A" * 100, "img_" + "é" * 22, f" {ID}"):
        assert not ImageStore.is_valid_id(text) and not is_image_id(text)


# ----------------------------------------------------------------------------------- the server, every reader


async def _made(client: Client, n: int = 1) -> list[str]:
    made = await client.call_tool(
        "generate", {"prompt": P, "width": 64, "height": 64, "num_images": n, "seed": 5}
    )
    assert not made.is_error, made.content[0].text
    return [image["image_id"] for image in made.structured_content["images"]]


async def test_every_tool_reads_the_scheme_in_any_case(client: Client, input_dir: Path) -> None:
    first, second = await _made(client, 2)
    viewed = await client.call_tool("view_image", {"image_ids": f"IMAGE://{first}, Image://{second}\n"})
    assert not viewed.is_error, viewed.content[0].text
    assert [i["image_id"] for i in viewed.structured_content["images"]] == [first, second]
    exported = await client.call_tool(
        "export_image", {"image_id": f" IMAGE://{first}\n", "path": str(input_dir)}
    )
    assert not exported.is_error, exported.content[0].text
    assert (input_dir / f"{first}.png").is_file()
    composed = await client.call_tool(
        "compose",
        {"images": f"IMAGE://{first}, {second}", "prompt": P, "width": 64, "height": 64, "seed": 1},
    )
    assert not composed.is_error, composed.content[0].text
    assert composed.structured_content["images"][0]["parents"] == [first, second]
    rendered = await client.get_prompt(
        "compare_images", {"image_ids": f"IMAGE://{first} {second}", "goal": "g"}
    )
    assert [m.content.type for m in rendered.messages] == ["text", "image"]


BAD = ["img_short", "IMG_" + TAIL, "image:" + ID, "IMAGE://img_nope", f"image://{ID}/meta"]


@pytest.mark.parametrize("bad", BAD)
async def test_every_tool_and_prompt_refuses_a_bad_reference_with_one_sentence(
    client: Client, tiny_spy: Any, input_dir: Path, bad: str
) -> None:
    with pytest.raises(ImageRefError) as rule:
        parse_image_ref(bad)
    expected = str(rule.value)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("view_image", {"image_ids": bad}),
        ("view_image", {"image_ids": [bad]}),
        ("export_image", {"image_id": bad, "path": str(input_dir)}),
        ("edit", {"image": bad, "prompt": P}),
        ("compose", {"images": [bad], "prompt": P}),
    ]
    for tool, arguments in calls:
        result = await client.call_tool(tool, arguments)
        assert result.is_error and result.content[0].text == f"Error executing tool {tool}: {expected}", (
            tool,
            result.content[0].text,
        )
    with pytest.raises(MCPError) as prompt_error:
        await client.get_prompt("compare_images", {"image_ids": bad, "goal": "g"})
    assert prompt_error.value.error.message == expected
    assert tiny_spy.calls == []


async def test_a_relative_camera_file_name_gets_the_path_message_not_the_id_one(client: Client) -> None:
    edited = await client.call_tool("edit", {"image": "IMG_1234.JPG", "prompt": P})
    assert (
        edited.is_error
        and "'IMG_1234.JPG' is a relative path: give an absolute path" in edited.content[0].text
    )
    viewed = await client.call_tool("view_image", {"image_ids": "IMG_1234.JPG"})
    assert viewed.content[0].text.endswith(
        "'IMG_1234.JPG' is not an image id, and this argument takes ids only: an id is img_ followed by 22 "
        "letters, digits, '-' or '_', and case matters; copy one from a previous result or list_images"
    )


# ------------------------------------------------------------------------------------------- CLI and server


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "loading model" not in err and err.count("\n") == 1, err
    return err.removeprefix("klein-agent: error: ").rstrip("\n")


@pytest.mark.parametrize("bad", ["img_short", "IMG_" + TAIL, "IMAGE://img_nope", f"image://{ID}/meta"])
async def test_the_cli_and_the_server_refuse_a_bad_reference_with_the_same_sentence(
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    bad: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # no file of that name: the CLI reads it as a reference
    cli = _cli_error(["generate", "--model", "tiny", "--prompt", P, "--image", bad, "--out", "o.png"], capsys)
    which = f"--image {bad}: "
    assert cli.startswith(which), cli
    server = (await client.call_tool("edit", {"image": bad, "prompt": P})).content[0].text
    assert server == f"Error executing tool edit: {cli.removeprefix(which)}"


def test_the_cli_says_an_id_is_no_file_and_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = _cli_error(["generate", "--model", "tiny", "--prompt", P, "--image", ID, "--out", "o.png"], capsys)
    assert cli == (
        f"--image {ID}: {ID!r} is an image id of the server's store, and the command line reads files: write it "
        f"to a file with the export_image tool (or save image://{ID}) and pass that file's path"
    )


@pytest.mark.parametrize("name", ["IMG_1234.JPG", ID, f"{ID}.png"])
def test_the_cli_reads_a_file_of_any_such_name(
    tiny_spy: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    """A file wins over the reading as a reference: `rerun_command` names parents `<id>.png`, cameras IMG_1234."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(
        tmp_path / name, format="JPEG" if name.endswith("JPG") else "PNG"
    )
    # --strength without a mask is refused after every --image is read and before the model loads: reaching it
    # means the file was read.
    argv = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        P,
        "--image",
        name,
        "--strength",
        "0.5",
        "--out",
        "o.png",
    ]
    assert _cli_error(argv, capsys) == "--strength applies to masked edits: add --mask or --box"
