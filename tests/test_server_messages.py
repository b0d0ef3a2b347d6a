"""Messages every client can read (issue 9, point 7): no answer over `limits.MAX_MESSAGE_BYTES`.

A real `klein-agent serve` over stdio, its store filled directly (tests/store_writer.py's noise PNGs), read with the
official MCP client: a PNG that fits comes back as stored, one that fits only as lossless WebP comes back as WebP
with the same pixels, and a 2048x2048 noise PNG (a 16 MiB line as base64) is an error that names export_image,
after which the session goes on. The raw stdio lines are measured too.
"""

from __future__ import annotations

import base64
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR
from PIL import Image

from klein_agent.rules import limits
from klein_agent.service.message_images import fit_png
from klein_agent.service.store import ImageStore
from tests.http_helpers import REPO, serve_args
from tests.store_writer import tiny_png

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def smooth_png(side: int) -> bytes:
    """A gradient stored without compression: a PNG over the message budget whose lossless WebP is small."""
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def fill_store(root: Path) -> dict[str, tuple[str, bytes]]:
    pictures = {
        "noise 2048": (2048, tiny_png(2048, random.Random(0))),
        "noise 1024": (1024, tiny_png(1024, random.Random(1))),
        "smooth 1536": (1536, smooth_png(1536)),
    }
    ids = {}
    with ImageStore(root) as store:
        for name, (side, png) in pictures.items():
            stored = store.put(png, width=side, height=side, recipe={"tool": "import", "name": name})
            ids[name] = (stored.image_id, png)
    return ids


def test_the_pictures_span_the_three_cases() -> None:
    budget = limits.MAX_MESSAGE_BLOB_BYTES
    assert len(tiny_png(2048, random.Random(0))) * 4 / 3 > 16 * 2**20 > budget  # a 16 MiB line today
    assert len(tiny_png(1024, random.Random(1))) < budget
    smooth = smooth_png(1536)
    assert budget < len(smooth) and fit_png(smooth, budget).mime_type == "image/webp"


async def test_resource_reads_stay_under_the_message_limit(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ids = fill_store(store)
    params = StdioServerParameters(command=sys.executable, args=serve_args(store), cwd=REPO)
    async with Client(params) as client:
        small_id, small_png = ids["noise 1024"]
        read = (await client.read_resource(f"image://{small_id}")).contents
        assert read[0].mime_type == "image/png"
        assert base64.b64decode(read[0].blob) == small_png  # type: ignore[union-attr]  # the stored bytes

        smooth_id, smooth = ids["smooth 1536"]
        read = (await client.read_resource(f"image://{smooth_id}")).contents
        assert read[0].mime_type == "image/webp", "the MIME type says what the bytes are"
        webp = base64.b64decode(read[0].blob)  # type: ignore[union-attr]
        assert len(webp) < len(smooth)
        same = np.asarray(Image.open(io.BytesIO(webp))) == np.asarray(Image.open(io.BytesIO(smooth)))
        assert same.all(), "lossless: every pixel as stored"

        noise_id, _ = ids["noise 2048"]
        with pytest.raises(MCPError) as caught:
            await client.read_resource(f"image://{noise_id}")
        error = caught.value.error
        assert error.code == INTERNAL_ERROR
        assert f"Call export_image with image_id '{noise_id}'" in error.message
        assert "12.0 MiB as PNG" in error.message and "8 MiB" in error.message

        view = await client.call_tool(
            "view_image", {"image_ids": [noise_id, small_id, noise_id], "max_edge": 1568}
        )
        assert not view.is_error
        assert len(view.model_dump_json(by_alias=True)) < limits.PREVIEW_BUDGET_B64 * 1.1
        listed = await client.call_tool("list_images", {})
        assert len(listed.structured_content["images"]) == 3, "the session goes on"


def test_no_stdio_line_is_over_the_limit(tmp_path: Path) -> None:
    """The raw wire: the answer to reading the 2048x2048 noise image is one short error line."""
    from tests.test_stopping import RawStdio

    store = tmp_path / "store"
    ids = fill_store(store)
    server = RawStdio(tmp_path)
    assert server.store == store
    try:
        server.start_session()
        assert server.proc.stdout
        for request_id, name in enumerate(["noise 2048", "noise 1024"], start=5):
            server.send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "method": "resources/read",
                    "params": {"uri": f"image://{ids[name][0]}"},
                }
            )
        lines = [server.proc.stdout.readline() for _ in range(2)]
        assert all(len(line) < limits.MAX_MESSAGE_BYTES for line in lines), [len(line) for line in lines]
        answers = {m["id"]: m for m in map(json.loads, lines)}
        assert "export_image" in answers[5]["error"]["message"]
        assert answers[6]["result"]["contents"][0]["mimeType"] == "image/png"
    finally:
        server.close()
