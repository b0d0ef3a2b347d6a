"""NaN and ±Infinity in float arguments: JSON as Python's `json` writes it (`NaN`, `Infinity`) reaches the server
(the SDK's parser takes them), and the CLI's `float()` reads `nan` and `inf`. Every float argument refuses them with
the one sentence both give ("strength must be a finite number, got NaN"): no traceback, no bare "Error executing
tool", no pydantic text, nothing stored, and the server goes on answering.

The official Python SDK client cannot send them: it serializes with pydantic, which writes NaN and Infinity as null
(what a NaN becomes on that path is tested in test_same_messages.py). So the server here is a real `serve --model
tiny` process spoken to in raw JSON-RPC lines, as any client that uses `json.dumps` would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from klein_agent.rules import masks
from klein_agent.rules.loras import check_scale, parse_lora_argument
from klein_agent.rules.resolution import RequestError, check_finite, resolve_sampling
from klein_agent.service.store import ImageStore
from tests.test_same_messages import cli_message
from tests.test_stopping import RawStdio

NAN, INF = float("nan"), float("inf")
BOX = "0,0,0.5,0.5"

# (case, CLI arguments after `generate ... --image SOURCE`, inpaint arguments beside image and prompt, message)
CASES: list[tuple[str, list[str], dict[str, Any], str]] = [
    ("NaN box x", ["--box", "nan,0,0.5,0.5"], {"boxes": [[NAN, 0, 0.5, 0.5]]}, "box 1: x must be a finite number, got NaN"),
    ("infinite box width", ["--box", "0,0,inf,0.5"], {"boxes": [[0, 0, INF, 0.5]]}, "box 1: width must be a finite number, got Infinity"),
    (
        "second box's y",
        ["--box", BOX, "--box", "0,-Infinity,1,1"],
        {"boxes": [[0, 0, 0.5, 0.5], [0, -INF, 1, 1]]},
        "box 2: y must be a finite number, got -Infinity",
    ),
    ("NaN strength", ["--box", BOX, "--strength", "nan"], {"boxes": [[0, 0, 0.5, 0.5]], "strength": NAN}, "strength must be a finite number, got NaN"),
    ("-Infinity strength", ["--box", BOX, "--strength=-inf"], {"boxes": [[0, 0, 0.5, 0.5]], "strength": -INF}, "strength must be a finite number, got -Infinity"),
    ("Infinity guidance", ["--box", BOX, "--guidance", "Infinity"], {"boxes": [[0, 0, 0.5, 0.5]], "guidance": INF}, "guidance must be a finite number, got Infinity"),
]  # fmt: skip


def rule_checks(bad: float) -> list[tuple[Any, str]]:
    """Each shared rule that takes a float, called with `bad`, and the field its message names."""
    return [
        (lambda: check_finite(bad, "x"), "x"),
        (lambda: masks.check_strength(bad), "strength"),
        (
            lambda: resolve_sampling(1, bad, distilled=False, default_steps=1, default_guidance=1.0),
            "guidance",
        ),
        (lambda: check_scale(bad, "style"), "LoRA 'style': scale"),
        (lambda: masks.boxes_from([[0, 0, 1, bad]]), "box 1: height"),
        (lambda: masks.parse_box(f"0,{bad},1,1", 3), "box 3: y"),  # the CLI's --box: "0,nan,1,1"
    ]


def test_the_rules_refuse_non_finite_floats_by_name() -> None:
    """The shared rules alone (what the CLI and the studio call): each float refuses NaN and both infinities."""
    for bad, shown in ((NAN, "NaN"), (INF, "Infinity"), (-INF, "-Infinity")):
        for check, field in rule_checks(bad):
            with pytest.raises(RequestError) as caught:
                check()
            assert str(caught.value) == f"{field} must be a finite number, got {shown}"
    with pytest.raises(RequestError, match="scale must be a finite number, got NaN"):
        parse_lora_argument("style.safetensors:nan")
    assert masks.boxes_from([[1, 2, 3, 4]]) == [masks.Box(1.0, 2.0, 3.0, 4.0)]  # finite ones still pass


@pytest.mark.slow
def test_a_real_server_refuses_nan_and_infinity_with_the_clis_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (9, 8, 7)).save(source)
    expected = {}
    for case, cli_args, _, message in CASES:
        argv = ["generate", "--model", "tiny", "--prompt", "a door", "--image", str(source), *cli_args]
        expected[case] = cli_message([*argv, "--out", str(tmp_path / "o.png")], capsys)
        assert expected[case] == message, case

    server = RawStdio(tmp_path)
    try:
        server.start_session()

        def call(request_id: int, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
            params = {"name": tool, "arguments": arguments}
            server.send({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})
            result: dict[str, Any] = server.answer(request_id)["result"]
            return result

        made = call(2, "generate", {"prompt": "a wall", "width": 64, "height": 64, "seed": 1})
        image = made["structuredContent"]["images"][0]["image_id"]
        loras = [{"name": "style", "scale": NAN}]
        wrong = []
        # the same cases, and the float arguments only the server has (a LoRA choice's scale, nested in a list)
        sent = [(case, args, expected[case]) for case, _, args, _ in CASES] + [
            ("NaN LoRA scale", {"boxes": [[0, 0, 1, 1]], "loras": loras}, "LoRA 'style': scale must be a finite number, got NaN"),
            ("NaN as a box given as a string", {"boxes": "[[0, NaN, 1, 1]]"}, "box 1: y must be a finite number, got NaN"),
            ("Infinity as an integer", {"boxes": [[0, 0, 1, 1]], "seed": INF}, "seed must be an integer, not Infinity"),
        ]  # fmt: skip
        for k, (case, arguments, message) in enumerate(sent, start=10):
            assert "NaN" in json.dumps(arguments) or "Infinity" in json.dumps(
                arguments
            )  # what goes on the wire
            result = call(k, "inpaint", {"image": image, "prompt": "a door", **arguments})
            text = result["content"][0]["text"]
            if not (result.get("isError") and text == f"Error executing tool inpaint: {message}"):
                wrong.append(f"{case}: {text!r}")
        assert wrong == []
        status = call(99, "server_status", {})  # still answering
        assert status["structuredContent"]["store"]["images"] == 1  # the source only: nothing else stored
    finally:
        server.close()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "Error executing tool inpaint\n" not in log, log
    with ImageStore(server.store) as store:
        assert store.stats().count == 1
