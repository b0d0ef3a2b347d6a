"""`klein-agent generate --mask/--box/--strength` as a user runs it: a real subprocess on the tiny model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from test_cli_generate import provenance

from klein_agent.rules.recipes import rerun_command

pytestmark = pytest.mark.slow  # the CLI as subprocesses


def run(*args: str, model: str = "tiny", prompt: str = "a window") -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", model, "--prompt", prompt, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


def test_boxes_and_mask_and_the_recipe_remakes_the_file(tmp_path: Path) -> None:
    source = tmp_path / "room.png"
    Image.new("RGB", (150, 100), (40, 90, 160)).save(source)
    boxed = tmp_path / "boxed.png"
    done = run(
        "--image",
        str(source),
        "--box",
        "0.5,0,0.5,0.5",
        "--box",
        "8,40,32,24",
        "--seed",
        "3",
        "--out",
        str(boxed),
    )
    assert done.returncode == 0, done.stderr
    recipe = provenance(boxed)
    assert recipe["tool"] == "inpaint" and recipe["strength"] == 0.8 and recipe["parents"] == [str(source)]
    assert recipe["mask"] == {"boxes": [[0.5, 0, 0.5, 0.5], [8, 40, 32, 24]]}
    with Image.open(boxed) as image:
        assert image.size == (144, 96)

    mask = tmp_path / "mask.png"
    drawn = Image.new("L", (300, 200), 0)
    ImageDraw.Draw(drawn).ellipse((60, 40, 220, 180), fill=255)
    drawn.save(mask)
    masked = tmp_path / "masked.png"
    done = run(
        "--image", str(source), "--mask", str(mask), "--strength", "0.5", "--seed", "3", "--out", str(masked)
    )
    assert done.returncode == 0, done.stderr
    assert provenance(masked)["mask"] == {"image": str(mask)} and provenance(masked)["strength"] == 0.5

    # the gallery's rerun command (parents as <name>.png in the working folder) makes the same bytes
    argv = rerun_command(recipe, [], str(tmp_path / "again.png"))
    assert argv is not None and "--box" in argv
    argv = [a.replace(f"{source}.png", str(source)) for a in argv]
    again = subprocess.run([sys.executable, "-m", "klein_agent", *argv[1:]], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == boxed.read_bytes()


@pytest.mark.parametrize(
    ("size", "output"),
    [((333, 517), (320, 512)), ((100, 70), (96, 64))],  # all four sizes: test_masks, test_server_inpaint
)
def test_a_picture_whose_token_floor_changes_its_aspect(
    tmp_path: Path, size: tuple[int, int], output: tuple[int, int]
) -> None:
    """Flooring the sides to 16 px changes these pictures' aspect by 3-8%; diffusers inpaints them at the floored
    size, and so do --box and a mask drawn at the picture's own size."""
    source, mask = tmp_path / "src.png", tmp_path / "mask.png"
    Image.new("RGB", size, (40, 90, 160)).save(source)
    drawn = Image.new("L", size, 0)
    drawn.paste(255, (0, 0, size[0] // 2, size[1] // 2))
    drawn.save(mask)
    for how in (["--box", "0,0,0.5,0.5"], ["--mask", str(mask)]):
        out = tmp_path / "out.png"
        done = run("--image", str(source), *how, "--steps", "1", "--seed", "1", "--out", str(out))
        assert done.returncode == 0, done.stderr
        with Image.open(out) as image:
            assert image.size == output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--box", "0,0,10,10"], "need --image"),
        (["--image", "SRC", "--strength", "0.5"], "--strength applies to masked edits"),
        (["--image", "SRC", "--box", "0,0,10,10", "--strength", "0"], "strength must be above 0"),
        (["--image", "SRC", "--box", "0,0,10,10", "--strength", "1.2"], "strength must be above 0"),
        (["--image", "SRC", "--box", "0,0,10"], "is not X,Y,W,H"),
        (["--image", "SRC", "--box", "500,0,10,10"], "lies outside the 150x100 image"),
        (["--image", "SRC", "--box", "0,0,10,10", "--mask", "SQUARE"], "not both"),
        (["--image", "SRC", "--mask", "SQUARE"], "aspect ratios differ"),
        (["--image", "SRC", "--mask", "BLACK"], "repaints nothing"),
        (["--image", "SRC", "--box", "0,0,10,10", "--width", "64"], "keeps the image's size"),
    ],
)
def test_bad_mask_arguments_fail_before_the_model_loads(
    tmp_path: Path, args: list[str], message: str
) -> None:
    files = {"SRC": tmp_path / "src.png", "SQUARE": tmp_path / "sq.png", "BLACK": tmp_path / "black.png"}
    Image.new("RGB", (150, 100)).save(files["SRC"])
    Image.new("L", (64, 64), 255).save(files["SQUARE"])
    Image.new("L", (300, 200), 0).save(files["BLACK"])
    argv = [str(files.get(a, a)) for a in args]
    # a model that does not exist: the argument error must come first
    done = run(*argv, "--out", str(tmp_path / "x.png"), model=str(tmp_path / "no-such-model"))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "loading model" not in done.stderr


def test_lora_files_on_the_command_line(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from klein_agent.model.configs import preset

    d = preset("tiny").transformer.hidden_size
    g = torch.Generator().manual_seed(0)
    good = tmp_path / "style.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, d, generator=g),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(d, 2, generator=g),
        },
        str(good),
    )
    out = tmp_path / "styled.png"
    done = run("--lora", f"{good}:0.5", "--width", "64", "--height", "64", "--seed", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert provenance(out)["loras"] == [{"name": "style", "scale": 0.5}]
    plain = tmp_path / "plain.png"
    assert run("--width", "64", "--height", "64", "--seed", "1", "--out", str(plain)).returncode == 0
    assert plain.read_bytes() != out.read_bytes()

    wrong = tmp_path / "other.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, d + 8),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(d, 2),
        },
        str(wrong),
    )
    done = run("--lora", str(wrong), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2, done.stderr
    for fact in (
        str(wrong),
        "key 'lora_unet_double_blocks_0_img_attn_proj.lora_down.weight'",
        f"down [2, {d + 8}] and up [{d}, 2] do not fit layer double_blocks.0.img_attn.proj",
        "use one trained for this model",
    ):
        assert fact in done.stderr, (fact, done.stderr)
    for bad, message in (
        (f"{good}:9", "scale must be from -4 to 4"),
        (str(tmp_path / "none.safetensors"), "is not a file"),
    ):
        done = run("--lora", bad, "--out", str(tmp_path / "x.png"), model=str(tmp_path / "no-such-model"))
        assert done.returncode == 2 and message in done.stderr, done.stderr
