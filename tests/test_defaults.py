"""Every sampling default lives once, in rules/limits.py: the code reads it there, and the docs that restate it say
what it says.

Changing a default is a change to rules/limits.py alone. The code follows by itself (the first test changes the
values in a fresh process and looks at every reader); the prose in README.md and docs/ cannot be generated, so the
second test names each sentence that no longer matches and the file to update.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from klein_agent.rules import limits

ROOT = Path(__file__).resolve().parents[1]

# Values no default has, so a reader that kept its own copy shows up
CHANGED = {
    "DISTILLED_STEPS": 3,
    "DISTILLED_GUIDANCE": 1.0,
    "BASE_STEPS": 37,
    "BASE_GUIDANCE": 5.5,
    "DEFAULT_STRENGTH": 0.65,
    "SIZE_MULTIPLE": 16,
    "DEFAULT_TOKENS_PER_SIDE": 48,
    "FLUX3_DISTILLED_STEPS": 11,
    "FLUX3_BASE_STEPS": 43,
    "FLUX3_BASE_GUIDANCE": 2.5,
}

READERS = """
import contextlib, io, json, sys, typing
from klein_agent.rules import limits
for name, value in json.loads(sys.argv[1]).items():
    setattr(limits, name, value)

from klein_agent.cli import main
from klein_agent.loading import checkpoints
from klein_agent.model.configs import PRESETS
from klein_agent.server.tools import generation

out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(["generate", "--help"])
print(json.dumps({
    "presets": {name: [p.sampling.distilled, p.sampling.steps, p.sampling.guidance] for name, p in PRESETS.items()},
    "loader": [[s.distilled, s.steps, s.guidance] for s in (checkpoints.DISTILLED_SAMPLING, checkpoints.BASE_SAMPLING)],
    "help": " ".join(out.getvalue().split()),
    "steps_description": typing.get_args(generation.StepsArg)[1].description,
    "side_description": typing.get_args(generation.SideArg)[1].description,
}))
"""


def test_the_code_reads_the_defaults_from_limits() -> None:
    done = subprocess.run(
        [sys.executable, "-c", READERS, json.dumps(CHANGED)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    distilled = [True, CHANGED["DISTILLED_STEPS"], CHANGED["DISTILLED_GUIDANCE"]]
    base = [False, CHANGED["BASE_STEPS"], CHANGED["BASE_GUIDANCE"]]
    # the presets (tiny, mid and random: builds) and real checkpoints (the loader) read the same two
    assert seen["loader"] == [distilled, base]
    flux3_distilled = [True, CHANGED["FLUX3_DISTILLED_STEPS"], CHANGED["DISTILLED_GUIDANCE"]]
    flux3_base = [False, CHANGED["FLUX3_BASE_STEPS"], CHANGED["FLUX3_BASE_GUIDANCE"]]
    for name, sampling in seen["presets"].items():
        if name.startswith("flux3"):
            assert sampling == (flux3_base if "base" in name else flux3_distilled), name
        else:
            assert sampling == (base if "base" in name else distilled), name
    assert (
        f"({CHANGED['DISTILLED_STEPS']} distilled, {CHANGED['BASE_STEPS']} Base; FLUX 3: "
        f"{CHANGED['FLUX3_DISTILLED_STEPS']} distilled, {CHANGED['FLUX3_BASE_STEPS']} Base)" in seen["help"]
    )
    assert (
        f"(default {CHANGED['BASE_GUIDANCE']}; FLUX 3 Base: {CHANGED['FLUX3_BASE_GUIDANCE']}," in seen["help"]
    )
    assert f"(default {CHANGED['DEFAULT_STRENGTH']})" in seen["help"]
    assert "else 768;" in seen["help"]  # 48 tokens of 16 px
    assert seen["steps_description"] == (
        f"Denoising steps. Omit for the model's default ({CHANGED['DISTILLED_STEPS']} for distilled FLUX.2 "
        f"[klein], {CHANGED['BASE_STEPS']} (guidance {CHANGED['BASE_GUIDANCE']:g}) for its Base; "
        f"{CHANGED['FLUX3_DISTILLED_STEPS']} for distilled FLUX 3 [klein], {CHANGED['FLUX3_BASE_STEPS']} "
        f"(guidance {CHANGED['FLUX3_BASE_GUIDANCE']:g}) for its Base)."
    )
    assert "Omit both for 768x768" in seen["side_description"]


def _g(value: float) -> str:
    return f"{value:g}" if value != int(value) else f"{value:.1f}"  # 4.0, 8.0, 0.8 as the docs write them


def doc_texts() -> list[tuple[str, str]]:
    """(file, a sentence it must contain), built from the current limits."""
    d, b, g = limits.DISTILLED_STEPS, limits.BASE_STEPS, _g(limits.BASE_GUIDANCE)
    side = limits.DEFAULT_TOKENS_PER_SIDE * limits.SIZE_MULTIPLE
    return [
        ("README.md", f"{d} steps for the distilled models, {b} with guidance {g} for the Base models"),
        ("README.md", f"`black-forest-labs/FLUX.2-klein-4B` | {d} |"),
        ("README.md", f"`black-forest-labs/FLUX.2-klein-base-4B` | {b}, CFG |"),
        ("README.md", f"`black-forest-labs/FLUX.2-klein-9B` | {d} |"),
        ("README.md", f"`black-forest-labs/FLUX.2-klein-base-9B` | {b}, CFG |"),
        ("README.md", f"`black-forest-labs/FLUX.2-klein-9b-kv` | {d} |"),
        (
            "docs/server.md",
            f"| {side} × {side}; one side given: a square | {limits.MIN_SIDE}-{limits.MAX_SIDE}, "
            f"multiple of {limits.SIZE_MULTIPLE} |",
        ),
        ("docs/server.md", f"the model's default ({d} for distilled klein, {b} for Base)"),
        (
            "docs/server.md",
            f"are its own: {limits.FLUX3_DISTILLED_STEPS} steps for the distilled model (a flow map, no guidance) "
            f"and {limits.FLUX3_BASE_STEPS} steps with guidance {limits.FLUX3_BASE_GUIDANCE:g} for Base",
        ),
        ("docs/server.md", f"the model's default, {g} (Base models only; distilled klein takes none)"),
        ("docs/server.md", f"default {_g(limits.DEFAULT_STRENGTH)}, diffusers' default"),
        ("docs/server.md", f"with the distilled models' {d} steps"),
        (
            "docs/server.md",
            f"the default guidance is {_g(limits.INPAINT_DEFAULT_GUIDANCE)}, "
            f"`Flux2KleinInpaintPipeline`'s own default (edits use {g})",
        ),
        (
            "docs/reference-parity.md",
            f"| {d} for distilled models, as BFL fixes them and the model cards use them; {b} for Base |",
        ),
        ("docs/reference-parity.md", f"| {g} for Base; none for distilled models, recorded as `null` |"),
        ("docs/reference-parity.md", f"| Base: the same; distilled: {d} steps |"),
        (
            "docs/server.md",
            f"`threshold` above 0 and at most {limits.STEP_CACHE_MAX_THRESHOLD:g}, default "
            f"{limits.STEP_CACHE_DEFAULT_THRESHOLD:g}",
        ),
        (
            "docs/server.md",
            f"after the first {limits.MAGCACHE_RETENTION_RATIO:.0%} of the steps, a step whose accumulated",
        ),
        ("docs/server.md", f"at most {limits.MAGCACHE_MAX_SKIP_STEPS} steps in a row; each guidance pass"),
    ]


@pytest.mark.parametrize("path,text", doc_texts(), ids=[f"{p}-{i}" for i, (p, _) in enumerate(doc_texts())])
def test_the_docs_state_the_defaults(path: str, text: str) -> None:
    flat = " ".join((ROOT / path).read_text().split())  # a sentence may wrap anywhere
    assert text in flat, (
        f"{path} no longer states a default as rules/limits.py has it: update {path} to say {text!r} "
        "(the defaults themselves live only in rules/limits.py)"
    )


def test_list_images_and_the_store_take_the_same_page_and_cursor(tmp_path: Path) -> None:
    from pydantic import TypeAdapter

    from klein_agent.server.tools.library import CursorArg, LimitArg
    from klein_agent.service import store as store_module
    from klein_agent.service.store import cursors

    limit_schema = TypeAdapter(LimitArg).json_schema()
    cursor_schema = TypeAdapter(CursorArg).json_schema()
    assert (limit_schema["minimum"], limit_schema["maximum"]) == (1, limits.MAX_LIST_LIMIT)
    assert [s.get("maxLength") for s in cursor_schema["anyOf"]] == [limits.MAX_CURSOR_CHARS, None]
    with store_module.ImageStore(tmp_path / "store") as store:
        assert store.list_images(limit=limits.MAX_LIST_LIMIT) == (
            [],
            None,
        )  # what the tool may ask, the store serves
        with pytest.raises(ValueError, match=f"from 1 to {limits.MAX_LIST_LIMIT}"):
            store.list_images(limit=limits.MAX_LIST_LIMIT + 1)
    # the longest cursor the store writes (the largest row number, the longest session) fits the schema, and
    # the store reads cursors up to the schema's length
    longest = cursors.encode_cursor(2**63 - 1, "x" * limits.SESSION_MAX_CHARS)
    assert len(longest) <= limits.MAX_CURSOR_CHARS
    assert (
        cursors.decode_cursor(longest, "x" * limits.SESSION_MAX_CHARS, store.catalog.valid_position)
        == 2**63 - 1
    )
    assert cursors._CURSOR_RE.fullmatch("A" * limits.MAX_CURSOR_CHARS)
    assert not cursors._CURSOR_RE.fullmatch("A" * (limits.MAX_CURSOR_CHARS + 1))
