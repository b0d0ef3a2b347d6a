"""Captions reaching a real FLUX 3 [klein] model end to end (issue 21, point 4): `klein-agent generate
--prompt-upsampler` and a real MCP client's `caption`, on a FLUX 3 folder and a Qwen3.5 upsampler that diffusers and
transformers themselves wrote (tests/flux3_reference_checkpoints.py, tests/upsampler_checkpoints.py).

The true parity is diffusers' modular pipeline WITH its prompt upsampler block, at its defaults, on the same two
checkpoints: its caption is the one our recipe records, its picture is within the parity bound of ours (>= 45 dB,
tests/test_pipeline_parity.py), and ours is, byte for byte, our pipeline called with that caption. A pipeline that
encoded the prompt instead of the caption fails all three.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from flux3_reference_checkpoints import ProcessorAdapter, write_flux3_checkpoint
from mcp import Client, StdioServerParameters
from PIL import Image
from test_flux3_serving import _png, _rerun_gives_the_same_png
from test_pipeline_parity import MIN_PSNR_DB, picture, psnr
from upsampler_checkpoints import load_reference_upsampler, reference_processor, write_tiny_upsampler

from klein_agent.pipeline import load_pipeline
from klein_agent.pipeline.flux3 import Flux3Pipeline
from klein_agent.rules import layout
from klein_agent.rules.recipes import rerun_command
from klein_agent.rules.upsampling import clean_caption
from klein_agent.service.pngfile import PROVENANCE_KEY

flux3_blocks = pytest.importorskip("diffusers.modular_pipelines.flux3.modular_blocks_flux3_distilled")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
PROMPT, EDIT = "a lighthouse on a cliff at dusk", "make it night"
EDIT_SIZE = (100, 70)  # kept whole on its 112x80 canvas and cropped back
BOX = [0.1, 0.05, 0.9, 0.45]  # a layout box, [y_min, x_min, y_max, x_max] in 0-1
BOX_TEXT = ",".join(str(v) for v in BOX)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flux3_checkpoint(tmp_path_factory.mktemp("flux3") / "klein")


@pytest.fixture(scope="module")
def upsampler(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_upsampler(tmp_path_factory.mktemp("pup") / "pup", clean_text=True)


@pytest.fixture(scope="module")
def ours(folder: Path) -> Flux3Pipeline:
    pipeline = load_pipeline(str(folder))
    assert isinstance(pipeline, Flux3Pipeline)
    return pipeline


@pytest.fixture(scope="module")
def reference(folder: Path, upsampler: Path) -> Any:
    """diffusers' distilled FLUX 3 pipeline as it ships: every block, the prompt upsampler included, its defaults."""
    pipe = flux3_blocks.Flux3DistilledAutoBlocks().init_pipeline(str(folder))
    pipe.load_components(dtype=torch.float32)
    pipe.update_components(
        prompt_upsampler=load_reference_upsampler(upsampler),
        prompt_upsampler_processor=reference_processor(upsampler),
    )
    pipe.tokenizer = ProcessorAdapter(pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rgb(path: Path | bytes) -> Image.Image:
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
        return image.convert("RGB")


def _recipe(path: Path) -> dict[str, Any]:
    with Image.open(path) as image:
        return json.loads(image.text[PROVENANCE_KEY])  # type: ignore[attr-defined]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "klein_agent", "generate", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


@pytest.mark.parametrize("name", ["t2i", "edit", "t2i_bbox", "i2i_bbox"])
def test_cli_prompt_upsampler_caption_reaches_the_model_as_diffusers_with_its_upsampler(
    name: str, folder: Path, upsampler: Path, ours: Flux3Pipeline, reference: Any, tmp_path: Path
) -> None:
    source = tmp_path / "source.png"
    picture(*EDIT_SIZE, seed=1).save(source)
    cli_args, our_args, ref_args = {
        "t2i": (
            ["--prompt", PROMPT, "--width", "64", "--height", "96"],
            {"height": 96, "width": 64},
            {"prompt": PROMPT, "height": 96, "width": 64},
        ),
        "edit": (
            ["--prompt", EDIT, "--image", str(source)],
            {"references": [_rgb(source)]},
            {"prompt": EDIT, "image": _rgb(source)},
        ),
        # the box modes: diffusers takes 0-1 boxes ({"bbox"} for t2i, {"from": "target", "tgt_bbox"} for an edit)
        "t2i_bbox": (
            ["--prompt", PROMPT, "--width", "64", "--height", "96", "--layout", f"{BOX_TEXT}:a lighthouse"],
            {"height": 96, "width": 64},
            {"prompt": PROMPT, "height": 96, "width": 64, "boxes": [{"bbox": BOX, "desc": "a lighthouse"}]},
        ),
        "i2i_bbox": (
            ["--prompt", EDIT, "--image", str(source), "--layout", f"{BOX_TEXT}:a moon"],
            {"references": [_rgb(source)]},
            {
                "prompt": EDIT,
                "image": _rgb(source),
                "boxes": [{"id": "obj_1", "desc": "a moon", "from": "target", "tgt_bbox": BOX}],
            },
        ),
    }[name]
    caption = reference(generator=torch.Generator().manual_seed(7), output="prompt", **ref_args)
    assert isinstance(caption, str) and caption and caption != ref_args["prompt"]
    # the fixture's premise (`clean_text`): the one caption rule keeps the upsampler's text as diffusers encodes it
    assert clean_caption(caption) == caption

    out = tmp_path / f"{name}.png"
    done = _cli(
        "--model",
        str(folder),
        "--prompt-upsampler",
        str(upsampler),
        *cli_args,
        "--seed",
        "7",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    recipe = _recipe(out)
    assert recipe["prompt"] == ref_args["prompt"] and recipe["caption"] == caption
    if "boxes" in ref_args:  # the box table closes the caption, the given box on the 0-1000 grid
        assert recipe["layout"] == [{"box": BOX, "label": ref_args["boxes"][0]["desc"]}]
        rows = layout.split_caption(caption)[1]
        assert rows is not None and [100, 50, 900, 450] in [
            row.get("bbox") or row.get("tgt_bbox") for row in rows
        ]
    made = _rgb(out)
    assert made.tobytes() == ours.pictures(caption, [7], **our_args)[0].tobytes()  # type: ignore[arg-type]
    assert made.tobytes() != ours.pictures(ref_args["prompt"], [7], **our_args)[0].tobytes()  # type: ignore[arg-type]
    want = reference(generator=torch.Generator().manual_seed(7), output="images", **ref_args)[0]
    db = psnr(made, want)
    print(f"CLI --prompt-upsampler {name} {want.size[0]}x{want.size[1]}: {db:.1f} dB against diffusers")
    assert db >= MIN_PSNR_DB

    # the recipe's command, without the upsampler: the stored caption verbatim, the same PNG bytes
    again = tmp_path / "again.png"
    argv = rerun_command(recipe, [str(source)] if name == "edit" else [], str(again))
    assert argv is not None and argv[argv.index("--caption") + 1] == caption
    rerun = argv[3:]  # after `klein-agent generate --model`: the model folder and the rest
    rerun = [str(source) if a == f"{source}.png" else a for a in rerun]
    assert ("--layout" in rerun) == ("boxes" in ref_args)
    done = _cli("--model", *rerun)
    assert done.returncode == 0, done.stderr
    assert again.read_bytes() == out.read_bytes()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_mcp_caption_is_encoded_verbatim_said_to_be_the_callers_and_reruns_byte_exact(
    folder: Path, ours: Flux3Pipeline, tmp_path: Path
) -> None:
    args = ["-m", "klein_agent", "serve", "--model", str(folder), "--store", str(tmp_path / "store")]
    server = StdioServerParameters(command=sys.executable, args=[*args, "--no-default-dirs"], cwd=REPO)
    caption = "Full-color photograph of a white lighthouse on a granite cliff at dusk.\nSoft orange light."
    async with Client(server) as client:
        made = await client.call_tool(
            "generate", {"prompt": PROMPT, "caption": caption, "width": 64, "height": 96, "seed": 7}
        )
        assert not made.is_error, made.content
        content = made.structured_content
        assert content is not None and content["caption_source"] == "caller"
        image_id = content["images"][0]["image_id"]
        got = _rgb(await _png(client, image_id))
        assert got.tobytes() == ours.pictures(caption, [7], height=96, width=64)[0].tobytes()
        assert got.tobytes() != ours.pictures(PROMPT, [7], height=96, width=64)[0].tobytes()
        meta = json.loads((await client.read_resource(f"image://{image_id}/meta")).contents[0].text)  # type: ignore[union-attr]
        assert meta["recipe"]["prompt"] == PROMPT and meta["recipe"]["caption"] == caption
        assert meta["rerun"]["arguments"]["caption"] == caption
        with anyio.fail_after(600):
            await _rerun_gives_the_same_png(client, image_id)


@pytest.mark.anyio
async def test_mcp_layout_puts_the_boxes_back_into_the_callers_caption_and_reruns_byte_exact(
    folder: Path, ours: Flux3Pipeline, tmp_path: Path
) -> None:
    """A caller's caption whose table moved the box (IoU >= 0.9) under another id, over a real MCP client: the
    model encodes the caption with the locked box put back and the id renamed; the rerun makes the same PNG."""
    args = ["-m", "klein_agent", "serve", "--model", str(folder), "--store", str(tmp_path / "store")]
    server = StdioServerParameters(command=sys.executable, args=[*args, "--no-default-dirs"], cwd=REPO)
    drifted = (
        'A white lighthouse <tower_1> on a cliff at dusk. [{"id": "tower_1", "bbox": [101, 52, 899, 449], '
        '"desc": "a white lighthouse"}]'
    )
    want = 'A white lighthouse <obj_1> on a cliff at dusk. [{"id": "obj_1", "bbox": [100, 50, 900, 450], '
    want += '"desc": "a white lighthouse"}]'
    boxes = [{"box": BOX, "label": "a lighthouse"}]
    async with Client(server) as client:
        made = await client.call_tool(
            "generate",
            {"prompt": PROMPT, "caption": drifted, "layout": boxes, "width": 64, "height": 96, "seed": 7},
        )
        assert not made.is_error, made.content
        image_id = made.structured_content["images"][0]["image_id"]  # type: ignore[index]
        got = _rgb(await _png(client, image_id))
        assert got.tobytes() == ours.pictures(want, [7], height=96, width=64)[0].tobytes()
        meta = json.loads((await client.read_resource(f"image://{image_id}/meta")).contents[0].text)  # type: ignore[union-attr]
        assert meta["recipe"]["caption"] == want and meta["recipe"]["layout"] == boxes
        assert meta["rerun"]["arguments"]["layout"] == boxes
        with anyio.fail_after(600):
            await _rerun_gives_the_same_png(client, image_id)
