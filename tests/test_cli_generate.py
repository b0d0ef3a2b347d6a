"""`klein-agent generate` as a user runs it: a real subprocess on the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from klein_agent.pipeline import initial_noise


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "klein_agent", "generate", "--model", "tiny", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_text_to_image_edit_and_compose(tmp_path: Path) -> None:
    first = tmp_path / "first.png"
    done = run(
        "--prompt", "a red cube", "--width", "96", "--height", "64", "--seed", "5", "--out", str(first)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # stdout stays clean: it is the MCP wire under `serve`
    assert "seed 5" in done.stderr
    with Image.open(first) as image:
        assert image.size == (96, 64) and image.mode == "RGB"

    edited = tmp_path / "edited.png"
    done = run("--prompt", "make it blue", "--image", str(first), "--seed", "1", "--out", str(edited))
    assert done.returncode == 0, done.stderr
    with Image.open(edited) as image:
        assert image.size == (96, 64)  # no size given: the reference's

    composed = tmp_path / "composed.png"
    done = run(
        "--prompt",
        "image 1 next to image 2",
        "--image",
        str(first),
        "--image",
        str(edited),
        "--width",
        "128",
        "--height",
        "64",
        "--num-images",
        "2",
        "--out",
        str(composed),
    )
    assert done.returncode == 0, done.stderr
    seeds = [int(s) for s in re.findall(r"seed (\d+)", done.stderr)]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1  # a drawn seed is reported, then seed + 1
    assert (tmp_path / "composed-1.png").is_file() and (tmp_path / "composed-2.png").is_file()


def test_same_seed_same_picture(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        assert (
            run(
                "--prompt", "x", "--width", "48", "--height", "48", "--seed", "9", "--out", str(out)
            ).returncode
            == 0
        )
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.tobytes() == ib.tobytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "50"], "width must be a positive multiple of 16"),
        (["--out", "x.jpg"], "--out must name a .png file"),
        (["--image", "/no/such.png"], "No such file"),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    base = ["--prompt", "x", "--height", "48", "--width", "48", "--out", str(tmp_path / "o.png")]
    done = run(*base, *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_noise_is_the_reference_formula() -> None:
    want = torch.randn((1, 16, 3, 4), generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert torch.equal(initial_noise(42, 16, 3, 4), want)
