"""The critique tools on a real `klein-agent serve --model tiny` over stdio: the official Python SDK client runs the
loop (generate, edit, compare_images, view_image with a region, record_verdict, list_images by standing), and raw
JSON-RPC lines send what that client cannot (NaN): each bad value is named, nothing is stored, the server keeps
serving and logs no traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from PIL import Image

from klein_agent.service.store import ImageStore
from tests.http_helpers import REPO, serve_args
from tests.test_stopping import RawStdio

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_loop_over_stdio(tmp_path: Path) -> None:
    store, inputs = tmp_path / "store", tmp_path / "inputs"
    inputs.mkdir()
    Image.new("RGB", (128, 96), (30, 90, 160)).save(inputs / "start.png")
    server = StdioServerParameters(
        command=sys.executable, args=serve_args(store, "--allow-dir", str(inputs)), cwd=REPO
    )
    async with Client(server) as client:
        edited = await client.call_tool(
            "edit", {"image": str(inputs / "start.png"), "prompt": "a boat", "seed": 3}
        )
        assert not edited.is_error, edited.content
        made = edited.structured_content["images"][0]
        source = made["parents"][0]
        compared = await client.call_tool("compare_images", {"a": source, "b": made["image_id"]})
        assert not compared.is_error, compared.content
        found = compared.structured_content
        assert (found["a_size"], found["b_size"], found["alignment"]) == ([128, 96], [128, 96], "same size")
        for region in found["regions"]:  # on the token grid, inside b
            x, y, w, h = region["box_px"]
            assert x % 16 == y % 16 == 0 and x + w <= 128 and y + h <= 96
        assert compared.content[0].type == "image" and found["verdict"] in compared.content[1].text

        zoom = await client.call_tool(
            "view_image", {"image_ids": made["image_id"], "region": [0.5, 0.5, 0.5, 0.5]}
        )
        assert not zoom.is_error and "region [64, 48, 64, 48] px of 128x96" in zoom.content[1].text

        for verdict, reason in (("note", "the hull is blurred"), ("pick", "closest to the brief")):
            judged = await client.call_tool(
                "record_verdict", {"image_id": made["image_id"], "verdict": verdict, "reason": reason}
            )
            assert not judged.is_error, judged.content
        picks = await client.call_tool("list_images", {"standing": "pick"})
        [entry] = picks.structured_content["images"]
        assert (entry["image_id"], entry["verdict"], entry["verdict_reason"], entry["notes"]) == (
            made["image_id"],
            "pick",
            "closest to the brief",
            ["the hull is blurred"],
        )
    with ImageStore(store, read_only=True) as reopened:  # durable, in the catalog
        standing = reopened.verdicts([made["image_id"]])[made["image_id"]].standing
        assert standing is not None and standing.reason == "closest to the brief"


def test_nan_in_a_region_or_a_box_is_named_over_raw_json_rpc(tmp_path: Path) -> None:
    server = RawStdio(tmp_path)
    try:
        server.start_session()

        def call(request_id: int, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
            params = {"name": tool, "arguments": arguments}
            server.send({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})
            result: dict[str, Any] = server.answer(request_id)["result"]
            return result

        made = call(2, "generate", {"prompt": "a wall", "width": 64, "height": 64, "seed": 1})
        image = made["structuredContent"]["images"][0]["image_id"]
        nan, inf = float("nan"), float("inf")
        cases = [
            ("view_image", {"image_ids": image, "region": [nan, 0, 1, 1]}, "region: x must be a finite number, got NaN"),
            ("view_image", {"image_ids": image, "region": [0, 0, inf, 1]}, "region: width must be a finite number, got Infinity"),
            ("compare_images", {"a": image, "b": image, "expected_box": [0, nan, 1, 1]}, "expected_box: y must be a finite number, got NaN"),
        ]  # fmt: skip
        for k, (tool, arguments, message) in enumerate(cases, start=10):
            result = call(k, tool, arguments)
            assert (
                result.get("isError")
                and result["content"][0]["text"] == f"Error executing tool {tool}: {message}"
            )
        status = call(99, "server_status", {})
        assert status["structuredContent"]["store"]["images"] == 1  # still serving, nothing else stored
    finally:
        server.close()
    assert "Traceback" not in server.log_path.read_text()
