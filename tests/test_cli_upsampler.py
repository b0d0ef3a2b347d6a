"""`--prompt-upsampler` and `--caption` on the command line, as a user runs them: real subprocesses, a real (tiny)
upsampler folder written by transformers: the refusal of each option with a FLUX.2 model, named and before any
picture is made. With a FLUX 3 model they are tested end to end in test_flux3_captions.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from upsampler_checkpoints import write_tiny_upsampler

REPO = Path(__file__).resolve().parents[1]


def generate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", "tiny", "--prompt", "a red cube"]
    out = tmp_path / "out.png"
    done = subprocess.run(
        [*argv, *args, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert not out.exists()  # refused: nothing written
    return done


@pytest.mark.timeout(600)
def test_an_upsampler_or_a_caption_with_a_flux2_model_is_refused_by_name(tmp_path: Path) -> None:
    pup = write_tiny_upsampler(tmp_path / "pup")
    done = generate(tmp_path, "--prompt-upsampler", str(pup))
    assert done.returncode == 2, done.stderr
    assert "--model tiny: --prompt-upsampler is for FLUX 3 [klein] models" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    done = generate(tmp_path, "--caption", "Full-color photograph of a red cube.")
    assert done.returncode == 2, done.stderr
    assert "caption is for FLUX 3 [klein] models" in done.stderr and "Traceback" not in done.stderr
    # Ray replicas load the model without it: refused at start, before the store is created
    store = tmp_path / "store"
    serve = [sys.executable, "-m", "klein_agent", "serve", "--model", "tiny", "--store", str(store)]
    done = subprocess.run(
        [*serve, "--generator", "ray", "--prompt-upsampler", str(pup)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert "--prompt-upsampler does not apply with --generator ray" in done.stderr
    assert not store.exists()


def test_a_folder_that_is_no_upsampler_is_named_with_what_it_lacks(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_5"}')
    # a FLUX 3 model (the last --model wins): with a FLUX.2 one the family is refused first
    done = generate(tmp_path, "--model", "flux3-tiny", "--prompt-upsampler", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"--prompt-upsampler {tmp_path}: {tmp_path} lacks tokenizer_config.json" in done.stderr
    assert "loading model" not in done.stderr  # refused before the model loads


def _run(tmp_path: Path, model: str, *args: str) -> subprocess.CompletedProcess[str]:
    out = tmp_path / f"{model}.png"
    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", model, "--prompt", "a red cube"]
    done = subprocess.run(
        [*argv, "--width", "64", "--height", "64", "--steps", "1", "--seed", "1", *args, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and out.is_file(), done.stderr
    return done


@pytest.mark.timeout(600)
def test_generate_says_which_text_a_flux3_model_encoded_as_the_tool_result_does(tmp_path: Path) -> None:
    """One stderr line from the sentence a tool result's "Text encoded" carries, naming the CLI's own options, so
    a CLI user learns of --caption and --prompt-upsampler; a FLUX.2 model, which has no caption, says nothing."""
    from klein_agent.rules.upsampling import CAPTION_SENTENCES, CLI_CAPTION_SENTENCES

    plain = _run(tmp_path, "flux3-tiny").stderr
    assert f"text encoded: {CLI_CAPTION_SENTENCES['prompt']}\n" in plain, plain
    assert "pass --caption" in plain and "--prompt-upsampler" in plain
    # the same sentence as the tool result's, but for the options: the MCP one's first part, word for word
    assert CAPTION_SENTENCES["prompt"].split("; pass ")[0] in plain
    given = _run(tmp_path, "flux3-tiny", "--caption", "Full-color photograph of a red cube.").stderr
    assert f"text encoded: {CAPTION_SENTENCES['caller']}\n" in given, given
    assert "text encoded" not in _run(tmp_path, "tiny").stderr


@pytest.mark.timeout(600)
def test_a_layout_with_a_flux2_model_or_a_bad_box_is_refused_by_name(tmp_path: Path) -> None:
    done = generate(tmp_path, "--layout", "0.1,0.05,0.9,0.45:a red cube")
    assert done.returncode == 2, done.stderr
    assert "layout is for FLUX 3 [klein] models" in done.stderr and "Traceback" not in done.stderr
    done = generate(tmp_path, "--layout", "0.1,0.05,0.9,0.45:a red cube", "--layout", "0.9,0,0.1,1:a ball")
    assert done.returncode == 2, done.stderr
    assert "layout box 2 [0.9, 0.0, 0.1, 1.0] is inverted or empty" in done.stderr
    done = generate(tmp_path, "--layout", "0.1,0.05,0.9")
    assert (
        done.returncode == 2 and "--layout '0.1,0.05,0.9' is not y_min,x_min,y_max,x_max:label" in done.stderr
    )
