"""`klein-agent generate` as a user runs it: a real subprocess on the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from klein_agent.pipeline import initial_noise
from klein_agent.service.pngfile import PROVENANCE_KEY

REPO = Path(__file__).resolve().parents[1]
IN_ANOTHER_FOLDER = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, run from a tmp folder


def run(*args: str, prompt: str | bytes = "a red cube") -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", "tiny", "--prompt", prompt, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)  # type: ignore[arg-type]


def provenance(path: Path) -> dict[str, object]:
    with Image.open(path) as image:
        return json.loads(image.text[PROVENANCE_KEY])  # type: ignore[attr-defined]


@pytest.mark.slow
def test_text_to_image_edit_and_compose(tmp_path: Path) -> None:
    first = tmp_path / "first.png"
    done = run("--width", "96", "--height", "64", "--seed", "5", "--out", str(first))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # stdout stays clean: it is the MCP wire under `serve`
    assert "seed 5" in done.stderr
    with Image.open(first) as image:
        assert image.size == (96, 64) and image.mode == "RGB"
    assert provenance(first) == {
        "tool": "generate",
        "prompt": "a red cube",
        "seed": 5,
        "width": 96,
        "height": 64,
        "steps": 4,
        "guidance": None,
        "model": "tiny",
        "variant": "tiny",
        "parents": [],
    }

    edited = tmp_path / "edited.png"
    done = run(
        "--image", str(first), "--seed", "1", "--width", "128", "--out", str(edited), prompt="make it blue"
    )
    assert done.returncode == 0, done.stderr
    with Image.open(edited) as image:
        assert image.size == (128, 80)  # only a width: the height keeps the reference's 3:2
    assert provenance(edited)["tool"] == "edit" and provenance(edited)["parents"] == [str(first)]

    composed = tmp_path / "composed.png"
    done = run(
        *("--image", str(first), "--image", str(edited)),
        *("--num-images", "2", "--out", str(composed)),
        prompt="image 1 next to image 2",
    )
    assert done.returncode == 0, done.stderr
    seeds = [int(s) for s in re.findall(r"seed (\d+)", done.stderr)]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1  # a drawn seed is reported, then seed + 1
    for k in (1, 2):
        with Image.open(tmp_path / f"composed-{k}.png") as image:
            assert image.size == (96, 64)  # no size: image 1's, as the model prepares it


@pytest.mark.slow
def test_picture_k_of_a_batch_is_the_single_run_with_seed_plus_k(tmp_path: Path) -> None:
    reference = tmp_path / "ref.png"
    Image.effect_noise((128, 64), 60).convert("RGB").save(reference)
    common = ("--image", str(reference), "--width", "128", "--height", "64")
    batch, single = tmp_path / "batch.png", tmp_path / "single.png"
    assert run(*common, "--seed", "41", "--num-images", "2", "--out", str(batch)).returncode == 0
    assert run(*common, "--seed", "42", "--out", str(single)).returncode == 0
    assert (tmp_path / "batch-2.png").read_bytes() == single.read_bytes()  # pixels and provenance alike


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "50"], "width must be a multiple of 16 from 64 to 2048, got 50"),
        (["--width", "4096"], "width must be a multiple of 16 from 64 to 2048, got 4096"),
        (["--out", "x.jpg"], "--out must name a .png file"),
        (["--out", "/no/such/folder/x.png"], "the folder /no/such/folder does not exist"),
        (["--image", "/no/such.png"], "'/no/such.png' does not exist on this machine"),
        (["--image", '"/tmp/quoted.png"'], "is wrapped in quotes"),
        (["--seed", "-1"], "seed must be an integer from 0 to 4294967295, got -1"),
        (["--seed", "4294967296"], "seed must be an integer from 0 to 4294967295"),
        (["--seed", "4294967295", "--num-images", "2"], "use a seed of at most 4294967294"),
        (["--num-images", "5"], "num_images must be from 1 to 4"),
        (["--steps", "0"], "steps must be from 1 to 100"),
        (["--guidance", "0.5"], "guidance must be from 1 (no guidance) to 20"),
        (["--width", "2048", "--height", "2048", "--num-images", "2"], "megapixel limit per call"),
        (["--max-megapixels", "0"], "argument --max-megapixels: must be positive, got 0"),
        (["--model", "nosuch"], "--model 'nosuch' is neither a folder here nor a Hugging Face repo id"),
        (["--model", "/no/such/folder"], "--model /no/such/folder: there is no folder /no/such/folder"),
        (["--model", "no-owner/not-cached"], "`hf download no-owner/not-cached`"),
        (["--device", "gpu"], "--device 'gpu': choose cpu, cuda, cuda:N (N = 0, 1, ...) or mps"),
        (
            ["--transformer-file", "/no/such.safetensors"],
            "--transformer-file /no/such.safetensors is not a file",
        ),
        (["--lora", "style.safetensors:abc"], "the scale 'abc' is not a number"),
        (
            ["--lora", "/no/style.safetensors:0.5"],
            "--lora /no/style.safetensors:0.5: /no/style.safetensors is not",
        ),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(tmp_path: Path, args: list[str], message: str) -> None:
    base = ["--width", "64", "--height", "64", "--out", str(tmp_path / "o.png")]
    done = run(*base, *args)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "loading model" not in done.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([(48, 80)], "the image is 48x80; both sides must be at least 64 px"),
        ([(64, 64), (900, 100)], "--image 2 of 2 ("),
        ([(64, 64), (48, 80)], "ref1.png): the image is 48x80"),
        ([(64, 64)] * 5, "5 reference images given, but this model takes at most 4"),
    ],
)
def test_references_are_checked_as_the_server_checks_them_before_the_model_loads(
    tmp_path: Path, sizes: list[tuple[int, int]], message: str
) -> None:
    images = []
    for k, size in enumerate(sizes):
        Image.new("RGB", size, (k, 2, 3)).save(tmp_path / f"ref{k}.png")
        images += ["--image", str(tmp_path / f"ref{k}.png")]
    done = run(*images, "--out", str(tmp_path / "o.png"))
    assert done.returncode == 2
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "loading model" not in done.stderr


def test_a_model_folder_without_an_index_is_named(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "klein_agent", "generate", "--model", "./", "--prompt", "x", "--out", "o.png"],
        cwd=tmp_path,
        env=IN_ANOTHER_FOLDER,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"--model ./: the folder {tmp_path} has no model_index.json" in done.stderr, done.stderr


@pytest.mark.skipif(
    not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no one may create a file"
)
def test_an_out_folder_that_takes_no_file_is_refused_before_loading_even_for_root(tmp_path: Path) -> None:
    # Permission bits say yes to root; only making a file tells. /proc refuses every user, root included.
    done = run("--width", "64", "--height", "64", "--out", "/proc/klein-agent-test.png")
    assert done.returncode == 2
    assert "--out /proc/klein-agent-test.png: cannot write in the folder /proc" in done.stderr, done.stderr
    assert "loading model" not in done.stderr and "Traceback" not in done.stderr


def test_a_prompt_that_is_not_utf8_is_refused_with_a_message(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", "tiny", "--prompt", b"a \xff cat"]
    done = subprocess.run(
        [*argv, "--out", str(tmp_path / "o.png")], capture_output=True, timeout=60, env={"LC_ALL": "C.UTF-8"}
    )
    stderr = done.stderr.decode()
    assert done.returncode == 2 and "not valid UTF-8 text (byte 0xff)" in stderr and "Traceback" not in stderr


def test_a_format_the_server_refuses_is_refused_with_its_message(tmp_path: Path) -> None:
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (80, 80), (1, 2, 3)).save(gif)
    done = run("--image", str(gif), "--out", str(tmp_path / "o.png"))
    assert done.returncode == 2
    assert "unsupported format GIF; use PNG, JPEG or WebP (convert the image first)" in done.stderr


def test_noise_is_the_reference_formula() -> None:
    want = torch.randn((1, 16, 3, 4), generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert torch.equal(initial_noise(42, 16, 3, 4), want)
    # drawing in the model dtype (as diffusers does) equals drawing in float32 and casting
    for dtype in (torch.bfloat16, torch.float16):
        drawn = torch.randn((1, 16, 3, 4), generator=torch.Generator("cpu").manual_seed(42), dtype=dtype)
        assert torch.equal(initial_noise(42, 16, 3, 4).to(dtype), drawn)


@pytest.mark.slow
def test_ctrl_c_during_the_progress_bar_ends_its_line_and_exits_130(tmp_path: Path) -> None:
    import os
    import pty
    import select
    import signal
    import time

    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", "tiny", "--prompt", "x"]
    argv += [
        "--width",
        "512",
        "--height",
        "512",
        "--steps",
        "100",
        "--num-images",
        "4",
        "--max-megapixels",
        "4.2",
    ]
    argv += ["--out", str(tmp_path / "o.png")]
    pid, fd = pty.fork()
    if pid == 0:  # the child: generate in a terminal, so the bar is drawn
        os.chdir(REPO)
        # A suite started in the background (`pytest &` from a script) runs with SIGINT ignored, and an ignored
        # signal stays ignored across exec (Python then installs no KeyboardInterrupt handler, as it should for a
        # background job): give the child the terminal's default, as an interactive shell would.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, argv)
    output, status = b"", None
    try:
        deadline = time.monotonic() + 120
        while b"] " not in output.rpartition(b"\r")[2]:  # a bar line is on the screen
            assert time.monotonic() < deadline, output.decode(errors="replace")
            if select.select([fd], [], [], 0.1)[0]:
                output += os.read(fd, 65536)
        os.write(fd, b"\x03")
        stopped_at = time.monotonic()
        with contextlib.suppress(OSError):  # EIO once the child has exited and its output is read to the end
            while True:
                assert time.monotonic() - stopped_at < 60, "Ctrl-C did not stop generate"
                if select.select([fd], [], [], 0.5)[0]:
                    if not (chunk := os.read(fd, 65536)):
                        break
                    output += chunk
        status = os.waitpid(pid, 0)[1]
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, output.decode(errors="replace")
    assert output.endswith(b"\n"), output[-200:]  # the shell's prompt starts on a line of its own
    assert b"Traceback" not in output and not list(tmp_path.glob("*.png"))
