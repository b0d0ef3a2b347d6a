"""One way in: the same file, seed and size give the same pixels from the CLI and from the server.

Both decode inputs with `service.inputs` (EXIF orientation applied, transparency on white, 16-bit scaled), size
outputs with `resolution.output_size` and run the same pipeline. The CLI runs as a real subprocess; the server is
reached through the official MCP client.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mcp import Client
from PIL import Image

from klein_agent.server.app import build_server
from klein_agent.service.inputs import read_image_file
from tests.conftest import make_server_state

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # the CLI as subprocesses beside a server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sideways_jpeg(path: Path) -> None:
    """320x192 pixels stored with EXIF Orientation 6: a viewer shows it 192x320 (rotated 90 degrees)."""
    image = Image.new("RGB", (320, 192), (30, 60, 200))
    image.paste((250, 220, 20), (0, 0, 160, 96))  # one bright quadrant, so a wrong rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())


def grey_ramp_16bit(path: Path) -> None:
    """256x256 16-bit greyscale, black to white left to right: true mean 50% grey."""
    ramp = np.tile(np.linspace(0, 65535, 256), (256, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(path, "PNG")


def transparent_rgba(path: Path) -> None:
    """A red square on a fully transparent background whose hidden colour is black."""
    image = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    image.paste((220, 30, 30, 255), (32, 32, 96, 96))
    image.save(path, "PNG")


def phone_photo(path: Path) -> None:
    """3024x4032, a 12-megapixel portrait photo."""
    ys = np.linspace(0, 255, 4032)[:, None, None]
    xs = np.linspace(0, 255, 3024)[None, :, None]
    pixels = np.concatenate(
        [
            np.broadcast_to(ys, (4032, 3024, 1)),
            np.broadcast_to(xs, (4032, 3024, 1)),
            np.full((4032, 3024, 1), 90.0),
        ],
        axis=2,
    )
    Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG", quality=80)


INPUTS: dict[str, tuple[Callable[[Path], None], str, tuple[int, int]]] = {
    # name: (writer, file name, the output size both must pick)
    "EXIF-rotated JPEG": (sideways_jpeg, "sideways.jpg", (192, 320)),
    "16-bit greyscale": (grey_ramp_16bit, "ramp16.png", (256, 256)),
    "transparent RGBA": (transparent_rgba, "rgba.png", (128, 128)),
    "12 Mpx phone photo": (phone_photo, "photo.jpg", (880, 1168)),
}


def test_the_decoder_handles_what_the_cli_got_wrong(tmp_path: Path) -> None:
    sideways_jpeg(tmp_path / "s.jpg")
    grey_ramp_16bit(tmp_path / "g.png")
    transparent_rgba(tmp_path / "t.png")
    load = lambda name: read_image_file(str(tmp_path / name), max_bytes=2**25, max_pixels=2**26).image  # noqa: E731
    assert load("s.jpg").size == (192, 320)  # EXIF orientation applied
    assert 120 < np.asarray(load("g.png")).mean() < 135  # scaled, not clipped (the CLI saw 254)
    rgba = np.asarray(load("t.png"))
    assert tuple(rgba[0, 0]) == (255, 255, 255) and tuple(rgba[64, 64]) == (220, 30, 30)  # white, not black


@pytest.fixture
async def client(tiny_pipeline: Any, tmp_path: Path, input_dir: Path) -> AsyncIterator[Client]:
    state = make_server_state(lambda: tiny_pipeline, tmp_path / "store", input_dir, max_input_bytes=8 * 2**20)
    try:
        async with Client(build_server(state), mode="auto", raise_exceptions=True) as connected:
            yield connected
    finally:
        state.engine.close()
        state.store.close()


@pytest.mark.parametrize("name", list(INPUTS))
async def test_cli_and_server_make_the_same_pixels(
    name: str, client: Client, input_dir: Path, tmp_path: Path
) -> None:
    write, filename, size = INPUTS[name]
    source = input_dir / filename
    write(source)
    out = tmp_path / "cli.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "klein_agent",
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "make it night",
            "--image",
            str(source),
            "--seed",
            "9",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = await client.call_tool(
        "edit", {"image": str(source), "prompt": "make it night", "seed": 9, "steps": 2}
    )
    assert not result.is_error, result.content[0].text
    image_id = result.structured_content["images"][0]["image_id"]
    blob = (await client.read_resource(f"image://{image_id}")).contents[0].blob  # type: ignore[union-attr]
    with Image.open(io.BytesIO(base64.b64decode(blob))) as served, Image.open(out) as cli:
        assert served.size == cli.size == size
        assert served.tobytes() == cli.tobytes()
