"""Start-up errors of `klein-agent generate`, `serve` and `gallery` as a user meets them (real subprocesses): bad
options are refused at once, before torch, transformers or the MCP SDK load, with a message that names the option."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_ANOTHER_FOLDER = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, run from a tmp folder


def main_and_loaded(tmp_path: Path, args: list[str], modules: list[str]) -> subprocess.CompletedProcess[str]:
    """`klein-agent ARGS` in a fresh interpreter, from another folder; its stdout is the exit status, then whether
    each of `modules` was imported by then ("True"/"False")."""
    loaded = ", ".join(f"{name!r} in sys.modules" for name in modules)
    script = (
        f"import sys; from klein_agent.cli import main; status = main(sys.argv[1:]); print(status, {loaded})"
    )
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=tmp_path,
        env=IN_ANOTHER_FOLDER,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--model", "tiny", "--http", "--port", "99999"],
        ["serve", "--model", "tiny", "--http", "--port", "-1"],
        ["gallery", "--port", "99999"],
        ["gallery", "--port", "http"],
    ],
)
def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "klein_agent", *args, "--store", str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "argument --port:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (
        "must be from 0 to 65535 (0 picks a free port)" in done.stderr
        or "expected a port number" in done.stderr
    )
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-queue", "-1"], "argument --max-queue: must be 0 or more, got -1"),
        (["--max-megapixels", "0"], "argument --max-megapixels: must be positive, got 0"),
        (["--store-max-gb", "-2"], "argument --store-max-gb: must be positive, got -2"),
        (["--store-max-images", "0"], "argument --store-max-images: must be positive, got 0"),
    ],
)
def test_serve_limits_are_checked_as_they_are_parsed(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "klein_agent",
            "serve",
            "--model",
            "tiny",
            "--store",
            str(tmp_path / "s"),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--model", "nosuch", "--prompt", "x", "--out", "o.png"],
        ["generate", "--model", "tiny", "--device", "gpu", "--prompt", "x", "--out", "o.png"],
        ["serve", "--model", "nosuch"],
        ["serve", "--model", "tiny", "--allow-dir", "/no/such/folder"],
        [
            "generate",
            "--model",
            "tiny",
            "--prompt-upsampler",
            "/no/such/pup",
            "--prompt",
            "x",
            "--out",
            "o.png",
        ],
        ["serve", "--model", "tiny", "--prompt-upsampler", "nobody/no-such-pup"],
    ],
)
def test_option_errors_come_before_torch_and_the_mcp_sdk_load(tmp_path: Path, args: list[str]) -> None:
    # The measure of "instant" that does not depend on the machine's speed: nothing heavy was imported.
    done = main_and_loaded(tmp_path, args, ["torch", "transformers", "mcp"])
    assert done.stdout.split() == ["2", "False", "False", "False"], done.stderr
    assert "--" in done.stderr and "Traceback" not in done.stderr


def test_help_shows_examples_and_every_option_says_what_it_is() -> None:
    import argparse
    import re

    from klein_agent.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first = re.search(r"klein-agent generate --model tiny [^\n]*", readme)
    assert first is not None and "examples:" in top and first[0] in top  # the README's first command
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert silent == []
    assert "what to make" in commands.choices["generate"].format_help()


def test_the_readme_pictures_written_in_the_clone_are_ignored_by_git() -> None:
    import re
    import shutil

    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    outs = re.findall(r"--out (\S+\.png)", (REPO / "README.md").read_text(encoding="utf-8"))
    assert "fox.png" in outs
    done = subprocess.run(
        [git, "check-ignore", "--no-index", *outs], cwd=REPO, capture_output=True, text=True
    )
    assert done.stdout.split() == outs, done.stderr


@pytest.mark.slow
def test_serve_typed_in_a_terminal_says_it_waits_for_a_client(tmp_path: Path) -> None:
    """stdin a terminal: one note on stderr (stdout stays the MCP wire, empty). stdin a pipe, as a client starts
    it: no note."""
    import pty
    import select
    import time

    argv = [sys.executable, "-m", "klein_agent", "serve", "--model", "tiny", "--store", str(tmp_path / "s")]
    argv += ["--no-default-dirs"]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        argv,
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=IN_ANOTHER_FOLDER,
    )
    os.close(follower)
    err = b""
    try:
        deadline = time.monotonic() + 120
        while b"waiting for an MCP client" not in err and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096)  # type: ignore[union-attr]
                if not chunk:
                    break
                err += chunk
    finally:
        proc.kill()
        out = proc.communicate(timeout=30)[0]
        os.close(leader)
    assert b"waiting for an MCP client on stdin" in err and b"not typed in a terminal" in err, err
    assert out == b""

    piped = subprocess.run(
        argv, input="", capture_output=True, text=True, cwd=tmp_path, env=IN_ANOTHER_FOLDER, timeout=120
    )
    assert "waiting for an MCP client" not in piped.stderr, piped.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["generate", "--model", "tiny", "--caption", "A red cube.", "--prompt", "x", "--out", "o.png"],
            "klein-agent: error: caption is for FLUX 3 [klein] models (it replaces the prompt their text encoder "
            "reads); a FLUX.2 [klein] model encodes the prompt as given: leave caption out",
        ),
        (
            [
                "generate",
                "--model",
                "tiny",
                "--prompt-upsampler",
                "/no/such/pup",
                "--prompt",
                "x",
                "--out",
                "o.png",
            ],
            "--model tiny: --prompt-upsampler is for FLUX 3 [klein] models (it writes the caption their text "
            "encoder reads); a FLUX.2 [klein] model encodes the prompt as given: leave --prompt-upsampler out",
        ),
        (
            [
                "generate",
                "--model",
                "tiny",
                "--layout",
                "0.1,0.05,0.9,0.45:a red cube",
                "--prompt",
                "x",
                "--out",
                "o.png",
            ],
            "klein-agent: error: layout is for FLUX 3 [klein] models (its boxes go into the caption they read); a "
            "FLUX.2 [klein] model takes no boxes: leave layout out, and say where things go in the prompt",
        ),
        (
            ["serve", "--model", "tiny", "--prompt-upsampler", "/no/such/pup"],
            "--model tiny: --prompt-upsampler is for FLUX 3 [klein] models",
        ),
    ],
)
def test_what_only_flux3_reads_is_refused_for_a_flux2_model_before_torch_loads(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """The family comes from --model's name or folder (`model_options.model_family`), as the inpaint and reference
    refusals use it: the user waits for no model to hear that the option does not apply."""
    done = main_and_loaded(tmp_path, args, ["torch"])
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "o.png").exists()


def _capitalised_word(word: str) -> bool:
    """ "A" or "Step": an ordinary word written at the start of a sentence (not FLUX, CFG, GPUs or DEBUG)."""
    return word[0].isupper() and (len(word) == 1 or word[1:].islower())


def test_option_help_starts_lower_case_and_shows_limits_as_the_errors_do() -> None:
    """Every option's help starts in lower case (a clause after the option name), --num-images shows its range and
    default from rules/limits.py, and --max-megapixels' default has the rounding its refusal uses."""
    import argparse

    from klein_agent.cli import build_parser
    from klein_agent.rules import limits
    from klein_agent.rules.resolution import RequestError, check_pixels

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    capitalised = [
        f"{name} {action.option_strings[-1]}: {action.help[:30]}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings and action.help and _capitalised_word(action.help.split()[0])
    ]
    assert capitalised == []
    text = " ".join(commands.choices["generate"].format_help().split())
    assert f"1 to {limits.MAX_IMAGES_PER_CALL} (default: 1)" in text, text
    try:  # the error's own rounding of the same limit
        check_pixels(4096, 4096, 1, limits.MAX_PIXELS_PER_CALL)
    except RequestError as exc:
        limit = re.search(r"over the ([\d.]+) megapixel limit", str(exc))
    assert limit is not None and f"(default {limit[1]}," in text, text
