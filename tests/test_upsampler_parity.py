"""The FLUX 3 prompt upsampler against diffusers' upsampler block, on a tiny Qwen3.5 written by transformers.

The reference is diffusers' own `Flux3AutoPromptUpsampleStep` run as a pipeline with its defaults (3584 new tokens,
greedy), over transformers' own `Qwen3VLProcessor` (tests/upsampler_checkpoints.py). Ours never imports diffusers
and builds the model's inputs without that processor; the captions must be the same text and the tensors the same
values, bit for bit (the same integer ids, the same float32 pixels: one preprocessing, no tolerance).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from klein_agent.loading.errors import CheckpointError
from klein_agent.loading.upsampler_source import check_upsampler_files
from klein_agent.rules import layout, limits, upsampling

diffusers_pup = pytest.importorskip("diffusers.modular_pipelines.flux3.prompt_upsampler")
from upsampler_checkpoints import (  # noqa: E402
    load_reference_upsampler,
    reference_processor,
    write_tiny_upsampler,
)

pytestmark = pytest.mark.timeout(600)


def _pictures() -> list[Image.Image]:
    """References of different sizes and modes: translucent RGBA (over white), a tall one, a palette picture."""
    gen = torch.Generator().manual_seed(3)
    noise = (torch.rand(201, 300, 4, generator=gen) * 255).to(torch.uint8).numpy()
    tall = (torch.rand(500, 90, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return [
        Image.fromarray(noise, "RGBA"),
        Image.fromarray(tall, "RGB"),
        Image.fromarray(tall[:64, :, :], "RGB").convert("P"),
    ]


@pytest.fixture(scope="module")
def upsampler_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_upsampler(tmp_path_factory.mktemp("pup"))


@pytest.fixture(scope="module")
def reference(upsampler_folder: Path):  # type: ignore[no-untyped-def]
    blocks = diffusers_pup.Flux3AutoPromptUpsampleStep()
    pipe = blocks.init_pipeline()
    pipe.update_components(
        prompt_upsampler=load_reference_upsampler(upsampler_folder),
        prompt_upsampler_processor=reference_processor(upsampler_folder),
    )
    return pipe


@pytest.fixture(scope="module")
def ours(upsampler_folder: Path):  # type: ignore[no-untyped-def]
    from klein_agent.pipeline.upsampler import load_upsampler

    return load_upsampler(str(upsampler_folder))


def test_shipped_prompts_are_diffusers_copy_verbatim() -> None:
    for mode, text in diffusers_pup.SYSTEM_PROMPTS.items():
        assert upsampling.system_prompt(mode) == text
    assert upsampling.edit_scaffold("X Y") == diffusers_pup.I2I_SCAFFOLD[False].format(instruction="X Y")
    assert upsampling.edit_scaffold("X Y", True) == diffusers_pup.I2I_SCAFFOLD[True].format(instruction="X Y")
    assert limits.LAYOUT_CANVAS == diffusers_pup.CANVAS
    assert limits.UPSAMPLER_MAX_NEW_TOKENS == diffusers_pup.MAX_NEW_TOKENS
    assert limits.UPSAMPLER_MAX_REFERENCES == diffusers_pup.MAX_REFERENCES
    assert limits.UPSAMPLER_REFERENCE_PIXELS == diffusers_pup.MAX_PIXELS_BY_REFS
    assert limits.UPSAMPLER_JPEG_QUALITY == diffusers_pup.JPEG_QUALITY


@pytest.mark.parametrize("count", [1, 2, 3, 10])
def test_reference_size_and_preparation_match_diffusers(count: int) -> None:
    for width, height in [
        (1, 1),
        (31, 33),
        (300, 201),
        (90, 500),
        (1025, 1023),
        (4000, 3000),
        (6400, 32),
        (2, 399),
    ]:
        assert upsampling.reference_size(width, height, count) == diffusers_pup.get_reference_size(
            width, height, count
        ), (width, height, count)
    for picture in _pictures():
        ours_prepared = upsampling.prepare_reference(picture, count)
        theirs = diffusers_pup.prepare_reference(picture, count)
        assert ours_prepared.size == theirs.size
        assert ours_prepared.tobytes() == theirs.tobytes()


def test_reference_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="200:1"):
        upsampling.reference_size(201 * 10, 10, 1)
    with pytest.raises(ValueError, match="at most 10 references, got 11"):
        upsampling.prepare_references([Image.new("RGB", (32, 32))] * 11)


@pytest.mark.parametrize("pictures", [0, 1, 2, 3], ids=["t2i", "one", "two", "three"])
def test_inputs_equal_transformers_processor(upsampler_folder: Path, ours, pictures: int) -> None:  # type: ignore[no-untyped-def]
    """The tensors our processor hands the model are the ones transformers' Qwen3VLProcessor makes for the same
    chat (rendered as diffusers' block calls it), exactly."""
    references = upsampling.prepare_references(_pictures()[:pictures])
    chat = upsampling.messages("a red fox in the snow", references)
    theirs = reference_processor(upsampler_folder).apply_chat_template(
        chat,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        enable_thinking=False,
    )
    mine = ours.inputs(chat)
    assert sorted(mine) == sorted(key for key in theirs if key != "token_type_ids")
    for key, value in mine.items():
        assert value.dtype == theirs[key].dtype, key
        assert torch.equal(value, theirs[key]), key
    if pictures:
        assert int(mine["mm_token_type_ids"].sum()) > 0


def test_text_to_image_caption_equals_diffusers_block(reference, ours) -> None:  # type: ignore[no-untyped-def]
    request = "a lighthouse at dusk, with the words 'OPEN LATE' on its door"
    theirs = reference(prompt=request, output="prompt")
    mine = ours.caption(request)
    assert mine == theirs
    assert mine and mine != request


def test_edit_caption_equals_diffusers_block(reference, ours) -> None:  # type: ignore[no-untyped-def]
    request = "make the sky orange"
    pictures = _pictures()[:2]
    theirs = reference(prompt=request, image=pictures, output="prompt")
    mine = ours.caption(request, pictures)
    assert mine == theirs
    # the pictures reach the model: the same request without them is captioned otherwise
    assert mine != ours.caption(request)


def test_upsampler_source_errors_name_flag_folder_and_fix(tmp_path: Path, upsampler_folder: Path) -> None:
    assert check_upsampler_files(str(upsampler_folder)) == upsampler_folder
    with pytest.raises(CheckpointError, match=r"--prompt-upsampler .*no such folder"):
        check_upsampler_files(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache; run `hf download"):
        check_upsampler_files("nobody/no-such-pup")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(
        CheckpointError, match=r"lacks tokenizer_config.json, preprocessor_config.json, \*.safetensors"
    ):
        check_upsampler_files(str(broken))
    for name in ("tokenizer_config.json", "preprocessor_config.json", "model.safetensors"):
        (broken / name).write_text("{}")
    with pytest.raises(CheckpointError, match=r"model_type 'qwen3', not 'qwen3_5'"):
        check_upsampler_files(str(broken))


LAYOUT = [
    layout.LayoutBox((0.1, 0.05, 0.9, 0.45), "a lighthouse"),
    layout.LayoutBox((0.6, 0.5, 0.95, 0.95), "a rowing boat"),
]


def test_text_to_image_layout_caption_equals_diffusers_block(reference, ours) -> None:  # type: ignore[no-untyped-def]
    """t2i_bbox: the same request and boxes ({'bbox', 'desc'} in 0-1, as diffusers takes them) give the same final
    caption, box table and all; the locked boxes are in it on the 0-1000 grid."""
    request = "a lighthouse at dusk and a boat"
    boxes = [{"bbox": list(box.box), "desc": box.label} for box in LAYOUT]
    theirs = reference(prompt=request, boxes=boxes, output="prompt")
    mine = ours.caption(request, layout=LAYOUT)
    assert mine == theirs
    rows = layout.split_caption(mine)[1]
    assert rows is not None and rows[:2] == layout.layout_rows(LAYOUT, edit=False)
    assert mine != ours.caption(request)  # the box mode's system prompt and request reach the model


def test_edit_layout_caption_equals_diffusers_block(reference, ours) -> None:  # type: ignore[no-untyped-def]
    """i2i_bbox: an edit's boxes are new content at the target ({'from': 'target', 'tgt_bbox'} in diffusers)."""
    request = "add a lighthouse and a boat"
    pictures = _pictures()[:2]
    boxes = [
        {"id": f"obj_{i}", "desc": box.label, "from": "target", "tgt_bbox": list(box.box)}
        for i, box in enumerate(LAYOUT, start=1)
    ]
    theirs = reference(prompt=request, image=pictures, boxes=boxes, output="prompt")
    mine = ours.caption(request, pictures, layout=LAYOUT)
    assert mine == theirs
    rows = layout.split_caption(mine)[1]
    assert rows is not None and rows[:2] == layout.layout_rows(LAYOUT, edit=True)


@pytest.mark.parametrize("pictures", [0, 2], ids=["t2i_bbox", "i2i_bbox"])
def test_layout_inputs_equal_transformers_processor(upsampler_folder: Path, ours, pictures: int) -> None:  # type: ignore[no-untyped-def]
    references = upsampling.prepare_references(_pictures()[:pictures])
    rows = upsampling.layout_rows(LAYOUT, pictures)
    chat = upsampling.messages("a red fox in the snow", references, rows)
    assert (
        chat[0]["content"][0]["text"]
        == diffusers_pup.SYSTEM_PROMPTS[("i2i" if pictures else "t2i") + "_bbox"]
    )
    theirs = reference_processor(upsampler_folder).apply_chat_template(
        chat,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        enable_thinking=False,
    )
    mine = ours.inputs(chat)
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
