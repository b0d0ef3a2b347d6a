"""FLUX 3 layouts (rules/layout.py) against diffusers' own box functions, and the checks on a caller's boxes.

diffusers' `reconcile_boxes`, `boxes_to_canvas` and `format_layout_request` are the reference: each crafted
upsampler answer (malformed JSON, near-duplicates, missing and extra rows) is reconciled by both and must give the
same text, character for character.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from klein_agent.rules import layout, limits
from klein_agent.rules.resolution import RequestError

diffusers_pup = pytest.importorskip("diffusers.modular_pipelines.flux3.prompt_upsampler")

BOXES = [
    layout.LayoutBox((0.1, 0.05, 0.9, 0.45), "a red umbrella"),
    layout.LayoutBox((0.2, 0.5, 0.6, 0.95), "a black cat"),
]


def _diffusers_boxes(edit: bool) -> list[dict]:
    """The same boxes as diffusers' block takes them."""
    if edit:
        return [
            {"id": f"obj_{i + 1}", "desc": b.label, "from": "target", "tgt_bbox": list(b.box)}
            for i, b in enumerate(BOXES)
        ]
    return [{"desc": b.label, "bbox": list(b.box)} for b in BOXES]


@pytest.mark.parametrize("edit", [False, True], ids=["t2i_bbox", "i2i_bbox"])
def test_rows_and_request_equal_diffusers(edit: bool) -> None:
    rows = layout.layout_rows(BOXES, edit)
    assert rows == diffusers_pup.boxes_to_canvas(_diffusers_boxes(edit))
    assert json.dumps(rows) == json.dumps(diffusers_pup.boxes_to_canvas(_diffusers_boxes(edit)))
    assert layout.layout_request(" a rainy street ", rows) == diffusers_pup.format_layout_request(
        " a rainy street ", rows
    )


def test_grid_rounds_as_diffusers() -> None:
    # half-way values: Python's round (half to even) on both sides, 0.0005 * 1000 is 0.5 -> 0
    box = layout.LayoutBox((0.0005, 0.0015, 0.5125, 1.0), "x")
    expected = diffusers_pup.boxes_to_canvas([{"bbox": list(box.box)}])[0]["bbox"]
    assert layout.to_grid(box.box) == expected


T2I_LOCKED = [
    {"id": "obj_1", "bbox": [100, 50, 900, 450], "desc": "a red umbrella"},
    {"id": "obj_2", "bbox": [200, 500, 600, 950], "desc": "a black cat"},
]
I2I_LOCKED = [
    {
        "id": "obj_1",
        "from": "target",
        "src_bbox": None,
        "tgt_bbox": [100, 50, 900, 450],
        "desc": "a red umbrella",
    },
]

CRAFTED = {
    # the upsampler kept the ids and wrote descriptions: they replace the labels
    "kept": 'A street <obj_1> and <obj_2>. [{"id": "obj_1", "bbox": [100, 50, 900, 450], "desc": "a big red '
    'umbrella "}, {"id": "obj_2", "bbox": [1, 2, 3, 4], "desc": "a cat"}]',
    # no table at all: the locked rows are appended with their labels
    "no table": "A street in the rain with an umbrella and a cat.",
    # broken JSON at the end: no table found, the text kept whole
    "malformed json": 'A street <umbrella_1>. [{"id": "umbrella_1", "bbox": [100, 50, 900, 450], "desc": "x"',
    # a near-duplicate (IoU >= 0.9) under another id is renamed to the locked id, in the caption too
    "near duplicate": 'An <umbrella_1> over a <cat_1>. [{"id": "umbrella_1", "bbox": [101, 52, 899, 449], "desc": '
    '"a wide umbrella"}, {"id": "cat_1", "bbox": [205, 505, 598, 948], "desc": "a cat"}]',
    # a box too far off (IoU < 0.9) stays an added row; an added row not cited, one with a bad id, 0-1 coordinates,
    # NaN, a bool, an inverted box, a missing desc, a non-dict row: all dropped
    "added and malformed": "A <lamp_1> and <far_1> and <tiny_1> and <inv_1> <nan_1> <b_1> <nodesc_1> <9bad>. ["
    '{"id": "far_1", "bbox": [300, 300, 700, 700], "desc": "far"}, {"id": "lamp_1", "bbox": [0, 0, 100, 40], '
    '"desc": " a lamp "}, {"id": "uncited_1", "bbox": [0, 0, 10, 10], "desc": "u"}, {"id": "9bad", "bbox": '
    '[0, 0, 10, 10], "desc": "b"}, {"id": "tiny_1", "bbox": [0.1, 0.1, 0.5, 0.5], "desc": "t"}, {"id": "inv_1", '
    '"bbox": [500, 0, 100, 10], "desc": "i"}, {"id": "nan_1", "bbox": [NaN, 0, 10, 10], "desc": "n"}, {"id": '
    '"b_1", "bbox": [true, 0, 10, 10], "desc": "b"}, {"id": "nodesc_1", "bbox": [0, 0, 10, 10]}, 7, "row"]',
    # an edit's rows: moved from a reference, new at the target, and bad combinations of from / boxes
    "edit rows": 'Move <cup_1> from <ref_image_0>, add <obj_9>, <bad_1>, <bad_2>, <big_1>. [{"id": "cup_1", '
    '"from": "ref_image_0", "src_bbox": [10, 10, 50, 50], "tgt_bbox": [60, 60, 90, 90], "desc": "a cup"}, '
    '{"id": "obj_9", "from": "target", "src_bbox": null, "tgt_bbox": [102, 51, 899, 450], "desc": "umbrella"}, '
    '{"id": "bad_1", "from": "target", "src_bbox": [10, 10, 50, 50], "tgt_bbox": null, "desc": "b"}, '
    '{"id": "bad_2", "from": "elsewhere", "src_bbox": [10, 10, 50, 50], "desc": "b"}, '
    '{"id": "big_1", "from": "ref_image_1", "src_bbox": [10, 10, 50, 1e400], "desc": "b"}]',
    # duplicated ids: the first valid one stays
    "duplicate ids": 'A <lamp_1>. [{"id": "lamp_1", "bbox": [0, 0, 100, 40], "desc": "one"}, {"id": "lamp_1", '
    '"bbox": [0, 0, 200, 40], "desc": "two"}, {"id": "obj_1", "bbox": [0, 0, 5, 5], "desc": ""}]',
    # a bracket in the prose, then a list that is not rows
    "list of numbers": "A sign reading [OPEN] at the door. [1, 2, 3]",
    "empty": "",
}


@pytest.mark.parametrize("name", list(CRAFTED))
@pytest.mark.parametrize("locked", [T2I_LOCKED, I2I_LOCKED, []], ids=["t2i", "i2i", "none"])
def test_reconcile_equals_diffusers(name: str, locked: list[dict]) -> None:
    text = CRAFTED[name]
    theirs = diffusers_pup.reconcile_boxes(text, copy.deepcopy(locked))
    before = copy.deepcopy(locked)
    assert layout.reconcile(text, locked) == theirs
    assert locked == before  # the locked rows are the caller's: not changed in place


def test_reconcile_puts_back_renames_and_drops() -> None:
    """What the crafted answers above show, said outright (so a change in diffusers cannot hide one here)."""
    caption, rows = layout.split_caption(layout.reconcile(CRAFTED["near duplicate"], T2I_LOCKED))
    assert caption == "An <obj_1> over a <obj_2>."
    assert rows == [
        {"id": "obj_1", "bbox": [100, 50, 900, 450], "desc": "a wide umbrella"},
        {"id": "obj_2", "bbox": [200, 500, 600, 950], "desc": "a cat"},
    ]
    caption, rows = layout.split_caption(layout.reconcile(CRAFTED["added and malformed"], T2I_LOCKED))
    assert [row["id"] for row in rows or []] == ["obj_1", "obj_2", "far_1", "lamp_1"]
    assert layout.split_caption(layout.reconcile(CRAFTED["no table"], T2I_LOCKED))[1] == T2I_LOCKED


def test_reconcile_is_idempotent_so_a_rerun_encodes_the_same_caption() -> None:
    for text in CRAFTED.values():
        once = layout.reconcile(text, T2I_LOCKED)
        assert layout.reconcile(once, T2I_LOCKED) == once


def test_reconcile_survives_what_diffusers_raises_on() -> None:
    """A row id that is a list (a caller's caption can hold anything): diffusers' function raises TypeError; ours
    drops the row, so a bad caption is a caption, not a server error."""
    text = 'A <obj_1>. [{"id": ["x"], "bbox": [100, 50, 900, 450], "desc": "d"}]'
    with pytest.raises(TypeError):
        diffusers_pup.reconcile_boxes(text, copy.deepcopy(T2I_LOCKED))
    assert layout.split_caption(layout.reconcile(text, T2I_LOCKED))[1] == T2I_LOCKED


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((0.1, 0.1, 0.5), r"layout box 2 has 3 values"),
        ((math.nan, 0.1, 0.5, 0.5), r"layout box 2 .*NaN or infinite"),
        ((0.1, 0.1, math.inf, 0.5), r"layout box 2 .*NaN or infinite"),
        ((0.1, -0.1, 0.5, 0.5), r"layout box 2 .*outside 0-1"),
        ((0.1, 0.1, 0.5, 1.5), r"layout box 2 .*outside 0-1"),
        (
            (0.5, 0.1, 0.1, 0.5),
            r"layout box 2 .*inverted or empty: the order is \[y_min, x_min, y_max, x_max\]",
        ),
        ((0.1, 0.5, 0.5, 0.5), r"layout box 2 .*inverted or empty"),
        ((0.1, 0.1, 0.1004, 0.5), r"layout box 2 .*under 1/1000"),
        ((0.1, True, 0.5, 0.5), r"layout box 2 has 4 values"),
    ],
)
def test_bad_boxes_are_named_with_their_problem(box: tuple, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        layout.check_layout([BOXES[0], layout.LayoutBox(box, "x")])


def test_labels_and_count_are_checked() -> None:
    with pytest.raises(RequestError, match=r"layout box 1 has an empty label"):
        layout.check_layout([layout.LayoutBox((0.1, 0.1, 0.5, 0.5), " \x00 ")])
    long = "x" * (limits.MAX_LAYOUT_LABEL_CHARS + 1)
    with pytest.raises(RequestError, match=rf"layout box 1's label is {len(long)} characters, over the"):
        layout.check_layout([layout.LayoutBox((0.1, 0.1, 0.5, 0.5), long)])
    too_many = [BOXES[0]] * (limits.MAX_LAYOUT_BOXES + 1)
    with pytest.raises(RequestError, match=rf"{limits.MAX_LAYOUT_BOXES + 1} boxes, over the"):
        layout.check_layout(too_many)
    layout.check_layout([BOXES[0]] * limits.MAX_LAYOUT_BOXES)


def test_cli_spelling() -> None:
    box = layout.parse_layout_box("0.1,0.05,0.9,0.45:a red: umbrella", 1)
    assert box == layout.LayoutBox((0.1, 0.05, 0.9, 0.45), "a red: umbrella")
    for bad in ("0.1,0.05,0.9,0.45", "0.1,0.05,0.9:x", "a,b,c,d:x"):
        with pytest.raises(RequestError, match=r"--layout .* is not y_min,x_min,y_max,x_max:label"):
            layout.parse_layout_box(bad, 1)
    with pytest.raises(RequestError, match=r"layout box 3 .*inverted"):
        layout.parse_layout_box("0.9,0.05,0.1,0.45:x", 3)
    with pytest.raises(RequestError, match=r"layout box 2 is not \{\"box\""):
        layout.layout_box({"box": [0.1, 0.1, 0.2, 0.2]}, 2)


def test_the_largest_layout_leaves_room_for_a_caption() -> None:
    """limits.MAX_LAYOUT_BOXES and MAX_LAYOUT_LABEL_CHARS are sized so the table of the largest layout plus a
    3,000-character caption (BFL's 350 words) still fits limits.MAX_CAPTION_CHARS."""
    largest = [layout.LayoutBox((0.1234, 0.1234, 0.9999, 0.9999), "x" * limits.MAX_LAYOUT_LABEL_CHARS)]
    for edit in (False, True):
        rows = layout.layout_rows(largest * limits.MAX_LAYOUT_BOXES, edit)
        assert len(layout.reconcile("w" * 3000, rows)) <= limits.MAX_CAPTION_CHARS
