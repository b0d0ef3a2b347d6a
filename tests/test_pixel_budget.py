"""The per-call pixel budget's default by device (issue 9, point 9): CUDA keeps 2048x2048, a CPU gets 512x512 so a
CPU user's call ends inside a client's ~60 s timeout, and a call that arrives while the model is still loading is
held to the loaded model's device."""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from PIL import Image

from klein_agent.cli import build_parser
from klein_agent.rules import limits, resolution
from klein_agent.server.app import build_server
from klein_agent.server.serve import build_studio
from tests.conftest import make_server_state

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_default_is_chosen_by_device_in_one_place() -> None:
    assert limits.default_max_pixels("cuda") == limits.default_max_pixels("cuda:1") == 2048 * 2048
    assert limits.default_max_pixels("cpu") == 512 * 512
    assert limits.default_max_pixels("mps") == 1024 * 1024
    assert limits.default_max_pixels("xpu") == limits.MAX_PIXELS_PER_CALL  # unknown devices: CUDA's


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], None),  # decided by the device of the model once it has loaded
        (["--device", "cpu"], 512 * 512),
        (["--device", "cuda:0"], 2048 * 2048),
        (["--device", "cpu", "--max-megapixels", "1.5"], 1_500_000),
    ],
)
def test_serve_options_choose_the_budget(tmp_path: Path, extra: list[str], expected: int | None) -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "tiny", "--store", str(tmp_path / "store"), "--no-default-dirs", *extra]
    )
    studio = build_studio(args)
    try:
        budget = studio.pixel_budget()
        assert (budget[0] if budget else None) == expected
    finally:
        studio.store.close()


def test_serve_help_names_each_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "4.2 on CUDA" in help_text and "1.05 on MPS" in help_text and "0.26 on a CPU" in help_text


async def test_a_cpu_model_refuses_more_than_512x512_by_default(
    tiny_spy: Any, tmp_path: Path, input_dir: Path
) -> None:
    state = make_server_state(lambda: tiny_spy, tmp_path / "store", input_dir, max_pixels_per_call=None)
    try:
        async with Client(build_server(state)) as client:
            refused = await client.call_tool("generate", {"prompt": "big", "width": 1024, "height": 1024})
            text = refused.content[0].text
            assert refused.is_error and "over the 0.26 megapixel limit per call (the default on cpu" in text
            assert "serve --max-megapixels raises it" in text
            assert tiny_spy.calls == []
            ok = await client.call_tool(
                "generate", {"prompt": "fits", "width": 256, "height": 256, "num_images": 4}
            )
            assert not ok.is_error
            status = await client.call_tool("server_status", {})
            assert status.structured_content["max_pixels_per_call"] == 512 * 512
            # No size given: the default (1024x1024, or the first image's) is the largest the budget allows.
            fitted = await client.call_tool("generate", {"prompt": "default", "num_images": 2})
            assert not fitted.is_error
            assert [(i["width"], i["height"]) for i in fitted.structured_content["images"]] == [
                (352, 352)
            ] * 2
            assert (tiny_spy.calls[-1].width, tiny_spy.calls[-1].height) == (352, 352)
    finally:
        state.engine.close()
        state.store.close()


MASKED_REMEDY = re.compile(
    r"a masked edit keeps its picture's size, so scale the picture down to at most (\d+)x(\d+)"
)


async def test_an_inpaint_over_the_budget_says_how_to_fit_it(
    tiny_spy: Any, tmp_path: Path, input_dir: Path
) -> None:
    """inpaint has no width or height: the refusal names the picture size that fits (and num_images for a
    batch), and the size it names is one that then runs."""
    state = make_server_state(lambda: tiny_spy, tmp_path / "store", input_dir, max_pixels_per_call=None)
    source = input_dir / "big.png"
    Image.new("RGB", (1000, 750), (40, 90, 160)).save(source)
    args = {"image": str(source), "prompt": "a window", "boxes": [[0, 0, 0.5, 0.5]], "steps": 1, "seed": 1}
    try:
        async with Client(build_server(state)) as client:
            refused = await client.call_tool("inpaint", args)
            text = refused.content[0].text
            assert refused.is_error and "1 image(s) of 992x736" in text, text
            assert f"over the {limits.default_max_pixels('cpu') / 1e6:.2f} megapixel limit per call" in text
            assert "serve --max-megapixels raises it" in text and "width/height" not in text
            assert "num_images" not in text  # one picture: only its size can change
            found = MASKED_REMEDY.search(text)
            assert found is not None, text
            w, h = int(found[1]), int(found[2])
            assert w * h <= limits.default_max_pixels("cpu") and abs(w / h - 992 / 736) < 0.1
            assert tiny_spy.calls == []

            Image.new("RGB", (w, h), (40, 90, 160)).save(source)
            made = await client.call_tool("inpaint", args)
            assert not made.is_error, made.content[0].text
            batch = await client.call_tool("inpaint", {**args, "num_images": 4})
            assert batch.is_error and "or lower num_images" in batch.content[0].text
    finally:
        state.engine.close()
        state.store.close()


def test_the_cli_refuses_an_inpaint_over_its_budget_before_loading(tmp_path: Path) -> None:
    import subprocess
    import sys

    source = tmp_path / "src.png"
    Image.new("RGB", (333, 517)).save(source)
    run = subprocess.run(
        [sys.executable, "-m", "klein_agent", "generate", "--model", str(tmp_path / "no-such-model"), "--prompt",
         "x", "--image", str(source), "--box", "0,0,10,10", "--out", str(tmp_path / "a.png"),
         "--max-megapixels", "0.1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "1 image(s) of 320x512 is 0.16 megapixels, over the 0.10 megapixel limit per call" in run.stderr
    assert "(--max-megapixels raises it)" in run.stderr and MASKED_REMEDY.search(run.stderr), run.stderr
    assert "loading model" not in run.stderr


@asynccontextmanager
async def loading_server(
    tiny_spy: Any, tmp_path: Path, input_dir: Path
) -> AsyncIterator[tuple[Client, Any, threading.Event]]:
    """A client of a server whose model loads until the yielded event is set; budget by device."""
    release = threading.Event()

    def slow_load() -> Any:
        release.wait(30)
        return tiny_spy

    state = make_server_state(slow_load, tmp_path / "store", input_dir, max_pixels_per_call=None)
    try:
        async with Client(build_server(state)) as client:
            yield client, state, release
    finally:
        release.set()
        state.engine.close()
        state.store.close()


async def test_a_call_made_while_loading_is_held_to_the_loaded_device(
    tiny_spy: Any, tmp_path: Path, input_dir: Path
) -> None:
    async with loading_server(tiny_spy, tmp_path, input_dir) as (client, state, release):
        status = await client.call_tool("server_status", {})
        assert status.structured_content["max_pixels_per_call"] is None, "unknown until the model loads"
        heard: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            heard.append(message or "")
            release.set()

        big = await client.call_tool(
            "generate", {"prompt": "big", "width": 768, "height": 768}, progress_callback=on_progress
        )
        assert "loading model" in heard
        assert (
            big.is_error
            and "over the 0.26 megapixel limit per call (the default on cpu" in big.content[0].text
        )
        assert tiny_spy.calls == [], "refused before the model ran"
        assert state.store.stats().count == 0
        ok = await client.call_tool("generate", {"prompt": "fits", "width": 512, "height": 512})
        assert not ok.is_error


async def test_an_unset_size_asked_while_loading_fits_the_loaded_devices_budget(
    tiny_spy: Any, tmp_path: Path, input_dir: Path
) -> None:
    async with loading_server(tiny_spy, tmp_path, input_dir) as (client, _state, release):

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            release.set()

        made = await client.call_tool("generate", {"prompt": "default"}, progress_callback=on_progress)
        assert not made.is_error, made.content[0].text
        assert (made.structured_content["images"][0]["width"], tiny_spy.calls[-1].height) == (512, 512)


def test_an_unset_size_is_scaled_into_the_budget_and_a_given_one_never_is() -> None:
    fit = resolution.output_size
    assert fit(None, None, None, max_pixels=512 * 512) == (512, 512)
    assert fit(None, None, None, max_pixels=4 * 1024 * 1024) == (1024, 1024)  # under the budget: unchanged
    assert fit(None, None, (880, 1168), max_pixels=512 * 512) == (432, 576)  # aspect kept, whole tokens
    w, h = fit(None, None, (2048, 256), max_pixels=100_000)
    assert w * h <= 100_000 and w % 16 == 0 and h % 16 == 0 and abs(w / h - 8) < 0.6
    assert fit(1024, 1024, None, max_pixels=512 * 512) == (
        1024,
        1024,
    )  # the caller's size: check_pixels refuses
    assert fit(1024, None, None, max_pixels=512 * 512) == (1024, 1024)


@pytest.mark.slow
def test_the_cli_asks_for_the_fitted_default_before_loading(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "a.png"
    run = subprocess.run(
        [sys.executable, "-m", "klein_agent", "generate", "--model", "tiny", "--prompt", "x", "--out", str(out),
         "--max-megapixels", "0.07", "--seed", "1", "--steps", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stderr and "256x256" in run.stderr
