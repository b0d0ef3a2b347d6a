"""FLUX 3 layouts: boxes placing the objects of a picture, through the caption as BFL's upsampler writes it. No torch.

FLUX 3 [klein] has no box input: BFL trained it on captions that cite each object as `<id>` and end with a JSON
table of boxes on a 0-1000 grid. A layout is the caller's boxes ([y_min, x_min, y_max, x_max] in 0-1, top-left
origin, as diffusers' upsampler block takes them) with a label each. This module checks them, turns them into the
table's rows, wraps the upsampler's request around them, and puts them back into whatever caption comes out
(`reconcile`, diffusers' `reconcile_boxes`: the upsampler's, or a caller's), so locked boxes never drift.
The rules are BFL's `flux3/bbox.py` as diffusers' `modular_pipelines/flux3/prompt_upsampler.py` adapts them;
tests/test_layout.py holds ours to that function's results.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from klein_agent.rules import limits
from klein_agent.rules.resolution import RequestError

# diffusers BOX_ID: what an id the upsampler adds must look like to be kept
BOX_ID = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
ADDED_ORIGIN = re.compile(r"ref_image_\d+|target")
LAYOUT_FORMAT = "y_min,x_min,y_max,x_max:label"


@dataclass(frozen=True)
class LayoutBox:
    """One box of a layout: `box` is (y_min, x_min, y_max, x_max) in fractions of the picture, `label` what goes
    there. Checked by `check_layout`, not on construction (so the message can name the box's place)."""

    box: tuple[float, ...]
    label: str

    def as_dict(self) -> dict[str, Any]:
        """The recipe's and the MCP argument's spelling: {"box": [y_min, x_min, y_max, x_max], "label": ...}."""
        return {"box": list(self.box), "label": self.label}


def layout_box(value: Any, number: int) -> LayoutBox:
    """A LayoutBox from the MCP argument / recipe spelling {"box": [4 numbers], "label": str} (or a LayoutBox).
    Raises RequestError naming box `number` (from 1) when it is not that shape."""
    if isinstance(value, LayoutBox):
        return value
    box = value.get("box") if isinstance(value, dict) else None
    label = value.get("label") if isinstance(value, dict) else None
    if not isinstance(box, (list, tuple)) or not isinstance(label, str):
        raise RequestError(
            f'layout box {number} is not {{"box": [y_min, x_min, y_max, x_max], "label": "..."}}: give '
            "four fractions of the picture (0 to 1, top-left origin) and a label"
        )
    return LayoutBox(tuple(box), label)


def parse_layout_box(text: str, number: int = 1) -> LayoutBox:
    """`y_min,x_min,y_max,x_max:label` (the CLI's --layout, the `number`th from 1) -> LayoutBox, checked.
    Raises RequestError for text that is not four numbers, a colon and a label, or as `check_layout_box` does."""
    coords, sep, label = text.partition(":")
    try:
        values = tuple(float(part) for part in coords.split(","))
    except ValueError:
        values = ()
    if not sep or len(values) != 4:
        raise RequestError(
            f"--layout {text!r} is not {LAYOUT_FORMAT}: give four fractions of the picture (0 to 1, top-left "
            "origin) and what goes there, e.g. --layout '0.1,0.05,0.9,0.45:a red umbrella'"
        )
    box = LayoutBox(values, label)
    check_layout_box(box, number)
    return box


def check_layout_box(box: LayoutBox, number: int) -> None:
    """Raises RequestError naming layout box `number` (from 1) and its problem: not four numbers, NaN or infinite,
    outside 0-1, inverted or empty (also once on the upsampler's 0-1000 grid), a label empty or too long."""
    name = f"layout box {number}"
    values = box.box
    if len(values) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise RequestError(f"{name} has {len(values)} values: give [y_min, x_min, y_max, x_max]")
    shown = [float(v) for v in values]
    if not all(math.isfinite(v) for v in shown):
        raise RequestError(f"{name} {shown} has a NaN or infinite value: give four fractions of the picture")
    if not all(0.0 <= v <= 1.0 for v in shown):
        raise RequestError(
            f"{name} {shown} is outside 0-1: coordinates are fractions of the picture (0.5 is the middle), "
            "[y_min, x_min, y_max, x_max]"
        )
    y0, x0, y1, x1 = shown
    if y1 <= y0 or x1 <= x0:
        raise RequestError(
            f"{name} {shown} is inverted or empty: the order is [y_min, x_min, y_max, x_max] (y first), with "
            "y_max above y_min and x_max above x_min"
        )
    grid = to_grid(box.box)
    if grid[2] <= grid[0] or grid[3] <= grid[1]:
        raise RequestError(
            f"{name} {shown} is under 1/{limits.LAYOUT_CANVAS} of the picture on a side: make it larger"
        )
    label = clean_label(box.label)
    if not label:
        raise RequestError(f'{name} has an empty label: say what goes in the box ("a red umbrella")')
    if len(label) > limits.MAX_LAYOUT_LABEL_CHARS:
        raise RequestError(
            f"{name}'s label is {len(label)} characters, over the {limits.MAX_LAYOUT_LABEL_CHARS} limit: name "
            "the object; the upsampler (or your caption) describes it"
        )


def check_layout(boxes: Sequence[LayoutBox]) -> None:
    """Every box checked (`check_layout_box`) and the count (limits.MAX_LAYOUT_BOXES). Raises RequestError."""
    if len(boxes) > limits.MAX_LAYOUT_BOXES:
        raise RequestError(
            f"the layout has {len(boxes)} boxes, over the {limits.MAX_LAYOUT_BOXES} limit: keep the objects "
            "whose place matters"
        )
    for number, box in enumerate(boxes, start=1):
        check_layout_box(box, number)


def clean_label(label: str) -> str:
    """A label without control characters or surrounding space (they would end up inside the JSON table)."""
    return "".join(ch for ch in label if unicodedata.category(ch) != "Cc").strip()


def to_grid(box: Sequence[float]) -> list[int]:
    """A 0-1 box on the upsampler's 0-1000 integer grid, clamped, rounded half to even (diffusers' `round`)."""
    return [round(max(0.0, min(1.0, float(v))) * limits.LAYOUT_CANVAS) for v in box]


def layout_rows(boxes: Sequence[LayoutBox], edit: bool) -> list[dict[str, Any]]:
    """The locked rows of the upsampler's box table for `boxes`, ids obj_1, obj_2, ... (diffusers' default).
    Text-to-image rows are {"id", "bbox", "desc"}; an edit's (`edit`: the i2i_bbox mode) are new content at its
    target, {"id", "from": "target", "src_bbox": null, "tgt_bbox", "desc"}, as that mode's table spells them."""
    rows: list[dict[str, Any]] = []
    for i, box in enumerate(boxes):
        row_id, desc, grid = f"obj_{i + 1}", clean_label(box.label), to_grid(box.box)
        if edit:
            rows.append({"id": row_id, "from": "target", "src_bbox": None, "tgt_bbox": grid, "desc": desc})
        else:
            rows.append({"id": row_id, "bbox": grid, "desc": desc})
    return rows


def layout_request(prompt: str, rows: list[dict[str, Any]]) -> str:
    """The upsampler's request in a box mode: the prompt, then the locked rows as one JSON line."""
    return (
        f"ORIGINAL PROMPT:\n{prompt.strip()}\n\n"
        "LOCKED BOUNDING-BOX ANNOTATIONS ([y_min, x_min, y_max, x_max] on a 0-1000 canvas, with (0, 0) at "
        "the top-left). This is an authoritative JSON list of dictionaries; preserve every supplied identity, "
        f"provenance value, null, and coordinate exactly:\n{json.dumps(rows, ensure_ascii=False)}"
    )


def split_caption(text: str) -> tuple[str, list[Any] | None]:
    """(caption, rows): rows is the JSON list that closes `text` (the last `[` from which the rest parses as a
    list), else None and the text stripped."""
    for i in range(len(text) - 1, -1, -1):
        if text[i] != "[":
            continue
        try:
            rows = json.loads(text[i:])
        except json.JSONDecodeError:
            continue
        if isinstance(rows, list):
            return text[:i].rstrip(), rows
    return text.strip(), None


def canvas_box(value: Any) -> list[Any] | None:
    """`value` as a list if it is a well-formed [y_min, x_min, y_max, x_max] on the 0-1000 grid, else None.
    All values at most 1 means 0-1 fractions, which the table never holds, so that is refused too."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    # `v != v` and abs() rather than math.isfinite, which raises on an integer too large for a float
    if any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == math.inf for v in value
    ):
        return None
    y0, x0, y1, x1 = value
    canvas = limits.LAYOUT_CANVAS
    if min(y0, x0) < 0 or y1 <= y0 or x1 <= x0 or max(y1, x1) > canvas or max(value) <= 1:
        return None
    return list(value)


def _added_row(row: Any, caption: str) -> dict[str, Any] | None:
    """A row the upsampler added, kept only when well formed and cited in the caption as `<id>`; else None."""
    if not isinstance(row, dict):
        return None
    row_id, desc = row.get("id"), row.get("desc")
    if not isinstance(row_id, str) or not BOX_ID.fullmatch(row_id) or f"<{row_id}>" not in caption:
        return None
    if not isinstance(desc, str) or not desc.strip():
        return None
    box = canvas_box(row.get("bbox"))
    if box is not None:
        return {"id": row_id, "bbox": box, "desc": desc.strip()}
    origin, src, tgt = row.get("from"), row.get("src_bbox"), row.get("tgt_bbox")
    src_box = None if src is None else canvas_box(src)
    tgt_box = None if tgt is None else canvas_box(tgt)
    if not isinstance(origin, str) or not ADDED_ORIGIN.fullmatch(origin):
        return None
    if (src is not None and src_box is None) or (tgt is not None and tgt_box is None):
        return None  # a box given but malformed: the row would misplace its object
    # a target row has no source box; a reference's row has one
    if (src_box is None and tgt_box is None) or (origin == "target") == (src_box is not None):
        return None
    return {"id": row_id, "from": origin, "src_bbox": src_box, "tgt_bbox": tgt_box, "desc": desc.strip()}


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [y_min, x_min, y_max, x_max] boxes (0 when the union is empty)."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _hashable(value: Any) -> bool:
    return not isinstance(value, (list, dict))


def _main_box(row: dict[str, Any]) -> Any:
    return row.get("bbox") or row.get("tgt_bbox") or row.get("src_bbox")


def reconcile(text: str, locked: list[dict[str, Any]]) -> str:
    """`text` (a caption ending in a box table, or not) with the `locked` rows (`layout_rows`) put back, as
    diffusers' `reconcile_boxes`: a row re-planning a locked box under another id (IoU >= LAYOUT_SAME_BOX_IOU)
    takes the locked id, in the table and in the caption's `<id>` citations; every locked row is kept with its
    coordinates, the text's description of it when there is one; rows the text added follow when well formed and
    cited; malformed ones are dropped. Returns "caption [rows as JSON]". Never raises; `text` is not changed."""
    caption, parsed = split_caption(text)
    # a row whose id is a list or an object (which diffusers' function raises TypeError on) is malformed: dropped
    rows = [dict(row) for row in parsed or [] if isinstance(row, dict) and _hashable(row.get("id"))]
    locked_ids = {lock["id"] for lock in locked}
    row_ids = {row.get("id") for row in rows}
    renamed: dict[Any, str] = {}
    for lock in locked:
        lock_box = _main_box(lock)
        if lock["id"] in row_ids or lock_box is None:
            continue
        for row in rows:
            if row.get("id") in renamed or row.get("id") in locked_ids:
                continue
            box = canvas_box(_main_box(row))
            if box is not None and iou(box, lock_box) >= limits.LAYOUT_SAME_BOX_IOU:
                renamed[row["id"]] = lock["id"]
                break
    for row in rows:
        if row.get("id") in renamed:
            row["id"] = renamed[row["id"]]
    for old, new in renamed.items():
        caption = caption.replace(f"<{old}>", f"<{new}>")

    by_id = {row["id"]: row for row in rows if isinstance(row.get("id"), str)}
    out: list[dict[str, Any]] = []
    for lock in locked:
        desc = by_id.get(lock["id"], {}).get("desc")
        kept = desc.strip() if isinstance(desc, str) and desc.strip() else lock.get("desc", "")
        out.append({**lock, "desc": kept})
    for row in rows:
        added = _added_row(row, caption)
        if added is not None and added["id"] not in {kept_row["id"] for kept_row in out}:
            out.append(added)
    return f"{caption} {json.dumps(out, ensure_ascii=False)}"
