"""One bad value, one message: the CLI (run in-process, nothing loaded) and a real MCP client get the same sentence,
which comes from the rule in `klein_agent.rules` both apply. Also the argument errors the schema alone answers:
wrong types, unknown keys in nested arguments, arguments to a tool that takes none, a list given as one string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from PIL import Image

from klein_agent.cli import main as cli_main

pytestmark = pytest.mark.anyio

P = "a red cube"
LONG = "x" * 2001


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# (case, CLI arguments after `generate --model tiny --prompt P`, tool, tool arguments without the prompt, prompt)
CASES: list[tuple[str, list[str], str, dict[str, Any], str]] = [
    ("width not a multiple", ["--width", "1000"], "generate", {"width": 1000}, P),
    ("width too small", ["--width", "32"], "generate", {"width": 32}, P),
    ("height too large", ["--height", "4096"], "generate", {"height": 4096}, P),
    ("negative seed", ["--seed", "-1"], "generate", {"seed": -1}, P),
    ("seed too large", ["--seed", "4294967296"], "generate", {"seed": 4294967296}, P),
    ("no steps", ["--steps", "0"], "generate", {"steps": 0}, P),
    ("too many steps", ["--steps", "101"], "generate", {"steps": 101}, P),
    ("too many images", ["--num-images", "5"], "generate", {"num_images": 5}, P),
    ("guidance too high", ["--guidance", "50"], "generate", {"guidance": 50}, P),
    ("guidance below 1", ["--guidance", "0.5"], "generate", {"guidance": 0.5}, P),
    ("empty prompt", [], "generate", {}, ""),
    ("prompt too long", [], "generate", {}, LONG),
    ("five references", ["--image", "{ref}"] * 5, "compose", {"images": ["{ref}"] * 5}, P),
    (
        "step cache threshold above 1",
        ["--step-cache", "magcache:1.5"],
        "generate",
        {"cache": {"kind": "magcache", "threshold": 1.5}},
        P,
    ),
    (
        "step cache threshold 0",
        ["--step-cache", "magcache:0"],
        "generate",
        {"cache": {"kind": "magcache", "threshold": 0}},
        P,
    ),
    ("unknown step cache", ["--step-cache", "firstblock"], "generate", {"cache": {"kind": "firstblock"}}, P),
    (
        "strength above 1",
        ["--image", "{ref}", "--box", "0,0,0.5,0.5", "--strength", "1.5"],
        "inpaint",
        {"image": "{ref}", "boxes": [[0, 0, 0.5, 0.5]], "strength": 1.5},
        P,
    ),
]


def _filled(value: Any, ref: str) -> Any:
    if isinstance(value, str):
        return value.replace("{ref}", ref)
    if isinstance(value, list):
        return [_filled(v, ref) for v in value]
    return value


def cli_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error `klein-agent generate` prints, without its `klein-agent: error: ` prefix."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "loading model" not in err, err
    prefix = "klein-agent: error: "
    assert err.startswith(prefix) and err.endswith("\n") and err.count("\n") == 1, err
    return err[len(prefix) : -1]


async def test_the_cli_and_the_server_give_the_same_message_for_each_bad_value(
    client: Client, tiny_spy: Any, input_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = input_dir / "ref.png"
    Image.new("RGB", (64, 64), (9, 8, 7)).save(ref)
    wrong = []
    for case, cli_args, tool, tool_args, prompt in CASES:
        argv = ["generate", "--model", "tiny", "--prompt", prompt, "--out", str(tmp_path / "o.png")]
        expected = cli_message(argv + _filled(cli_args, str(ref)), capsys)
        arguments = {"prompt": prompt, **_filled(tool_args, str(ref))}
        result = await client.call_tool(tool, arguments)
        text = result.content[0].text
        if not (result.is_error and text == f"Error executing tool {tool}: {expected}"):
            wrong.append(f"{case}: CLI {expected!r} / server {text!r}")
    assert not wrong, "\n".join(wrong)
    assert tiny_spy.calls == []


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("generate", {"prompt": P, "width": 64.5}, "width must be an integer, not a number (64.5)"),
        ("generate", {"prompt": P, "num_images": 1.5}, "num_images must be an integer, not a number (1.5)"),
        (
            "generate",
            {"prompt": P, "seed": -1, "height": 32, "width": 1000},  # reported in the tool's argument order
            "width must be a multiple of 16 from 64 to 2048, got 1000; height must be a multiple of 16 from 64 to "
            "2048, got 32; seed must be an integer from 0 to 4294967295, got -1",
        ),
        (
            "generate",
            {"prompt": P, "loras": [{"name": "style", "weight": 0.1}]},
            "loras[0] has no key 'weight'; it takes name, scale",
        ),
        (
            "edit",
            {"image": "img_" + "A" * 22, "prompt": P, "loras": [{"name": "s", "scale": 9}]},
            "LoRA 's': scale must be from -4 to 4",
        ),
        ("server_status", {"verbose": True}, "server_status takes no arguments"),
        (
            "compose",
            {"images": "/a/b.png, /c.png", "prompt": P},
            'pass a list, e.g. ["img_a", "/path/b.png"]',
        ),
    ],
)
async def test_argument_errors_the_schema_answers_read_like_our_own(
    client: Client, tiny_spy: Any, tool: str, arguments: dict[str, Any], message: str
) -> None:
    result = await client.call_tool(tool, arguments)
    text = result.content[0].text
    assert result.is_error and text.startswith(f"Error executing tool {tool}: ") and message in text, text
    assert "pydantic" not in text and "http" not in text
    assert tiny_spy.calls == []


IMG = "img_" + "A" * 22
BOXES = "boxes must be a list of [x, y, width, height] boxes"


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("inpaint", {"boxes": "0,0,0.5,0.5"}, f"{BOXES}, got a string"),
        ("inpaint", {"boxes": {"x": 0}}, f"{BOXES}, got an object"),
        ("inpaint", {"boxes": 5}, f"{BOXES}, got a number"),
        ("inpaint", {"boxes": [0, 0, 0.5, 0.5]}, f"{BOXES}, got a list of numbers: put each box in its own list"),
        ("inpaint", {"boxes": ["0,0,1,1"]}, "box 1 must be a list [x, y, width, height], got a string"),
        ("inpaint", {"boxes": [[0, 0, 1, 1], [0, "0", 1, 1]]}, "box 2: y must be a number, got a string"),
        ("inpaint", {"boxes": [[True, 0, 1, 1]]}, "box 1: x must be a number, got a boolean"),
        ("inpaint", {"boxes": [[0, 0, 1, None]]}, "box 1: height must be a number, got null"),
        # the SDK client writes a NaN or an infinity as null: a box holding one is refused, not half-read
        ("inpaint", {"boxes": [[float("nan"), 0, 1, 1]]}, "box 1: x must be a number, got null"),
        ("inpaint", {"boxes": [[0, 0, 1]]}, "box 1 has 3 numbers: give [x, y, width, height]"),
        ("generate", {"loras": [5]}, "loras[0] must be an object, not an integer (5)"),
        ("generate", {"loras": [{"name": 5}]}, "loras[0][name] must be a string, not an integer (5)"),
        ("generate", {"loras": [{"name": "s", "scale": "high"}]}, 'loras[0][scale] must be a number, not a string ("high")'),
        ("compose", {"images": [5]}, "images[0] must be a string, not an integer (5)"),
        ("generate", {"width": {"px": 64}}, 'width must be an integer, not an object ({"px": 64})'),
        ("generate", {"steps": [4]}, "steps must be an integer, not a list ([4])"),
    ],
)  # fmt: skip
async def test_every_wrong_type_names_the_type_it_got_in_words_nested_ones_too(
    client: Client, tiny_spy: Any, tool: str, arguments: dict[str, Any], message: str
) -> None:
    """Each answer names where the wrong value is and its type in words (it once read "boxes must be a list, not a
    list", naming neither)."""
    image = {"image": IMG} if tool == "inpaint" else {}
    result = await client.call_tool(tool, {**image, "prompt": P, **arguments})
    text = result.content[0].text
    assert result.is_error and text.startswith(f"Error executing tool {tool}: {message}"), text
    assert "must be a list, not a list" not in text and "pydantic" not in text
    assert tiny_spy.calls == []


async def test_the_server_keeps_answering_after_wrong_types(client: Client) -> None:
    for boxes in ("x", [[None] * 4], [[0, 0, 1, 1]] * 17):
        assert (await client.call_tool("inpaint", {"image": IMG, "prompt": P, "boxes": boxes})).is_error
    assert not (await client.call_tool("server_status", {})).is_error


async def test_every_nested_argument_object_refuses_unknown_keys(client: Client) -> None:
    """Each object schema a tool takes (LoRA choices, ...) is closed: a misspelt key is an error, not dropped."""

    def objects(schema: Any) -> list[dict[str, Any]]:
        found = []
        if isinstance(schema, dict):
            if schema.get("type") == "object" and "properties" in schema:
                found.append(schema)
            for value in schema.values():
                found += objects(value)
        elif isinstance(schema, list):
            for value in schema:
                found += objects(value)
        return found

    nested = []
    for tool in (await client.list_tools()).tools:
        for name, schema in tool.input_schema.get("$defs", {}).items():
            nested += [(tool.name, name, o) for o in objects(schema)]
    assert nested, "no nested argument objects found"
    assert [(t, n) for t, n, o in nested if o.get("additionalProperties") is not False] == []


async def test_compose_reads_a_string_of_ids_as_a_list_as_view_image_does(client: Client) -> None:
    made = await client.call_tool(
        "generate", {"prompt": P, "width": 64, "height": 64, "num_images": 2, "seed": 3}
    )
    first, second = (image["image_id"] for image in made.structured_content["images"])
    composed = await client.call_tool(
        "compose", {"images": f"{first}, image://{second}", "prompt": P, "width": 64, "height": 64, "seed": 1}
    )
    assert not composed.is_error, composed.content[0].text
    assert composed.structured_content["images"][0]["parents"] == [first, second]
    viewed = await client.call_tool("view_image", {"image_ids": f"{first} {second}"})
    assert [i["image_id"] for i in viewed.structured_content["images"]] == [first, second]


async def test_the_instructions_and_the_docs_intro_name_every_image_tool_and_loras(client: Client) -> None:
    """The text a client gets at initialize, and docs/server.md's first paragraph, stay true as tools are added."""
    image_tools = [
        tool.name
        for tool in (await client.list_tools()).tools
        if "loras" in tool.input_schema.get("properties", {})  # every tool that makes images takes LoRAs
    ]
    assert image_tools == ["generate", "edit", "compose", "inpaint"]
    docs = (Path(__file__).parents[1] / "docs" / "server.md").read_text()
    intro = docs.split("\n\n")[1]
    instructions = client.instructions
    assert instructions is not None
    for text in (instructions, intro):
        assert all(name in text for name in image_tools) and "LoRA" in text, text


async def test_guidance_given_to_a_distilled_model_is_said_to_be_ignored_by_both(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny model is distilled, as klein 4B/9B and 9B-KV are: guidance changes nothing, and the CLI's stderr
    and the tool result (summary and structured `notes`) say so in the same words; without guidance, nothing."""
    from klein_agent.rules.resolution import guidance_note

    note = guidance_note(2.5, distilled=True)
    assert note is not None and "guidance 2.5 is ignored by this distilled model" in note
    assert guidance_note(2.5, distilled=False) is None and guidance_note(None, distilled=True) is None
    argv = ["generate", "--model", "tiny", "--prompt", P, "--width", "64", "--height", "64", "--steps", "1"]
    capsys.readouterr()
    assert cli_main([*argv, "--guidance", "2.5", "--out", str(tmp_path / "a.png")]) == 0
    assert note in capsys.readouterr().err
    assert cli_main([*argv, "--out", str(tmp_path / "b.png")]) == 0
    assert "ignored" not in capsys.readouterr().err

    arguments = {"prompt": P, "width": 64, "height": 64, "steps": 1, "seed": 1}
    result = await client.call_tool("generate", {**arguments, "guidance": 2.5})
    assert not result.is_error and result.structured_content["notes"] == [note]
    assert f"Note: {note}." in result.content[1].text
    plain = await client.call_tool("generate", arguments)
    assert plain.structured_content["notes"] == [] and "Note:" not in plain.content[1].text


async def test_help_and_the_server_description_name_both_families(client: Client) -> None:
    """klein-agent runs FLUX.2 [klein] and FLUX 3 [klein]: what it says about itself names both, by the titles
    `rules.families` holds; the instructions name the model this server runs (tiny: FLUX.2)."""
    from klein_agent.cli import build_parser
    from klein_agent.rules import families

    titles = [f.title for f in families.FAMILIES.values()]
    assert len(titles) == 2
    described = client.server_info.description or ""
    help_text = build_parser().format_help()
    for text in (described, help_text):
        assert all(title in text for title in titles), text
    assert (client.instructions or "").startswith(f"Local {families.FLUX2.title} image tools")


async def test_the_python_sdk_sends_a_nan_seed_as_null_which_means_unset(client: Client) -> None:
    """What docs/server.md says of this client: pydantic writes NaN as null, so the seed arrives unset and a random
    one is used and reported (the server cannot tell it from a seed left out); a literal NaN is refused
    (test_non_finite.py)."""
    made = await client.call_tool(
        "generate", {"prompt": "x", "width": 64, "height": 64, "seed": float("nan")}
    )
    assert not made.is_error, made.content
    seed = made.structured_content["images"][0]["seed"]  # type: ignore[index]
    assert isinstance(seed, int) and 0 <= seed <= 2**32 - 1
