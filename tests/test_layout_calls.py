"""FLUX 3 layouts through a call (issue 21 point 4): the `layout` argument checked as the CLI and the server share
it, carried to the caption (the upsampler's box mode, a caller's caption reconciled, or the prompt with the table),
recorded in the recipe, and rerun byte-exact from the recipe's MCP call and CLI command. The generator is
test_captions' TextPainter (its picture is a function of the text it encodes), so a table that did not reach the
model, or a rerun that encoded other text, shows in the pixels. The upsampler's own box mode is held to diffusers'
block in test_upsampler_parity.py; real processes and MCP clients in test_cli_upsampler.py and
test_flux3_captions.py."""

from __future__ import annotations

import json
import math
import shlex

import pytest
from test_captions import FLUX2, CountingUpsampler, Pictures, TextPainter, budget, run

from klein_agent.cli import build_parser, image_call
from klein_agent.pipeline.captioning import CaptionedGenerator
from klein_agent.rules import layout
from klein_agent.rules.calls import Edit, Generate, Inpaint, picture_keys, prepare_call
from klein_agent.rules.recipes import rerun_call, rerun_command
from klein_agent.rules.requests import GenerationRequest, resolve
from klein_agent.rules.resolution import RequestError

LAYOUT = [
    {"box": [0.1, 0.05, 0.9, 0.45], "label": "a red umbrella"},
    {"box": [0.6, 0.5, 0.95, 0.95], "label": "a black cat"},
]
ROWS = layout.layout_rows([layout.layout_box(b, 1) for b in LAYOUT], edit=False)
# a caller's caption whose table moved the umbrella slightly under another id, and added a malformed row
DRIFTED = (
    "A rainy street, an umbrella <umbrella_1> and a cat <obj_2>. "
    '[{"id": "umbrella_1", "bbox": [101, 52, 899, 449], "desc": "a wide red umbrella"}, '
    '{"id": "obj_2", "bbox": [600, 500, 950, 950], "desc": "a black cat, sitting"}, {"id": "x", "bbox": [1, 2]}]'
)


def test_a_callers_caption_gets_the_boxes_back_and_reruns_byte_exact_from_mcp_and_cli() -> None:
    painter = TextPainter()
    call = Generate(prompt="umbrella and cat", caption=DRIFTED, layout=LAYOUT, width=64, height=64, seed=3)
    recipe, png = run(CaptionedGenerator(painter, None), call, upsampler=False)
    (encoded,) = painter.encoded
    caption, rows = layout.split_caption(encoded)
    assert caption == "A rainy street, an umbrella <obj_1> and a cat <obj_2>."  # renamed: IoU >= 0.9
    assert rows == [
        {**ROWS[0], "desc": "a wide red umbrella"},  # the locked box, not the drifted one
        {**ROWS[1], "desc": "a black cat, sitting"},
    ]
    assert recipe["caption"] == encoded and recipe["layout"] == LAYOUT

    again = rerun_call(recipe, [])
    assert again is not None and again["arguments"]["layout"] == LAYOUT
    painter.encoded.clear()
    assert run(CaptionedGenerator(painter, None), Generate(**again["arguments"]), False)[1] == png
    assert painter.encoded == [encoded]  # reconciling the reconciled caption changes nothing

    argv = rerun_command(recipe, [], "again.png")
    assert argv is not None
    from_cli = image_call(build_parser().parse_args(shlex.split(shlex.join(argv[1:]))))
    assert [b.as_dict() for b in from_cli.layout_boxes] == LAYOUT  # the CLI spelling round-trips the floats
    assert run(CaptionedGenerator(TextPainter(), None), from_cli, False)[1] == png


def test_the_upsampler_gets_the_layout_and_its_caption_is_recorded() -> None:
    pup = CountingUpsampler()
    call = Edit(prompt="add an umbrella", image="300x201", layout=LAYOUT[:1], seed=2)
    recipe, _ = run(CaptionedGenerator(TextPainter(), pup), call, upsampler=True)
    assert pup.layouts == [(layout.LayoutBox((0.1, 0.05, 0.9, 0.45), "a red umbrella"),)]
    assert recipe["caption"] == "add an umbrella, upsampled (1 references)" and recipe["layout"] == LAYOUT[:1]


def test_without_upsampler_or_caption_the_prompt_carries_the_table() -> None:
    painter = TextPainter()
    recipe, _ = run(
        CaptionedGenerator(painter, None), Generate(prompt="a street", layout=LAYOUT, seed=1), False
    )
    assert painter.encoded == [f"a street {json.dumps(ROWS)}"]
    assert (
        recipe["caption"] == painter.encoded[0]
    )  # a rerun passes it as a caption: reconciled again, the same
    # an edit's rows are new content at the target, the i2i_bbox table's spelling
    painter.encoded.clear()
    run(
        CaptionedGenerator(painter, None),
        Edit(prompt="add them", image="64x64", layout=LAYOUT, seed=1),
        False,
    )
    assert layout.split_caption(painter.encoded[0])[1] == layout.layout_rows(
        [layout.layout_box(b, 1) for b in LAYOUT], edit=True
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"box": [math.nan, 0, 0.5, 0.5], "label": "x"}, r"layout box 2 \[nan, 0.0, 0.5, 0.5\] has a NaN"),
        ({"box": [0.5, 0, 0.1, 0.5], "label": "x"}, r"layout box 2 .* is inverted"),
        ({"box": [0.1, 0, 0.5, 2], "label": "x"}, r"layout box 2 .* is outside 0-1"),
        ({"box": [0.1, 0, 0.5], "label": "x"}, r"layout box 2 has 3 values"),
        ({"bbox": [0.1, 0, 0.5, 0.5]}, r"layout box 2 is not \{\"box\""),
    ],
)
def test_bad_layouts_are_refused_before_any_work_naming_the_box(value: object, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        Generate(prompt="x", layout=[LAYOUT[0], value]).check()


def test_layout_is_refused_with_flux2_and_with_a_masked_edit() -> None:
    request = prepare_call(
        Generate(prompt="x", layout=LAYOUT), Pictures(), multiple=16, budget=budget
    ).request
    with pytest.raises(
        RequestError, match=r"layout is for FLUX 3 \[klein\] models.*a FLUX\.2 \[klein\] model takes no boxes"
    ):
        resolve(request, FLUX2)
    resolve(GenerationRequest(prompt="x"), FLUX2)  # the same request without a layout runs
    masked = Inpaint(prompt="x", image="64x64", boxes=[[0, 0, 0.5, 0.5]], layout=LAYOUT)
    with pytest.raises(RequestError, match="a masked edit takes no layout"):
        masked.check()


def test_an_idempotency_key_covers_the_layout() -> None:
    keyed = Generate(prompt="x", layout=LAYOUT, call_id="k1")
    moved = Generate(prompt="x", layout=[LAYOUT[1]], call_id="k1")
    boxed = Generate(prompt="x", layout=[layout.layout_box(b, 1) for b in LAYOUT], call_id="k1")
    assert picture_keys(keyed) != picture_keys(moved)
    assert picture_keys(boxed) == picture_keys(keyed)  # the CLI's values and the server's JSON are one call
