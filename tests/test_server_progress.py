"""Progress never silent (issue 9, point 9): heartbeats during any long unit, the decode included.

A client that resets its timeout on every progress notification must hear from the server at least every
`heartbeat_s` while a call runs — through the weights loading, the references encoding and each picture's decode,
none of which reports steps of its own. The decode runs one picture at a time (a report after each); a slowed
decoder (tests/fakes.SlowDecoder) stands in for a large CPU decode and must not change a single pixel.
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from PIL import Image

from klein_agent.server.app import build_server
from klein_agent.service.engine import HEARTBEAT_SPAN, Engine, EngineState
from tests.conftest import make_server_state
from tests.fakes import FakeGenerator, SlowDecoder

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 0.1
CALL = {"prompt": "a slow decode", "width": 64, "height": 64, "seed": 5, "num_images": 2}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _pixels(client: Client, image_ids: list[str]) -> list[bytes]:
    out = []
    for image_id in image_ids:
        blob = (await client.read_resource(f"image://{image_id}")).contents[0].blob  # type: ignore[union-attr]
        out.append(Image.open(io.BytesIO(base64.b64decode(blob))).tobytes())
    return out


async def test_progress_arrives_during_each_decode_and_the_pixels_do_not_change(
    tiny_pipeline: Any, tmp_path: Path, input_dir: Path
) -> None:
    state = make_server_state(lambda: tiny_pipeline, tmp_path / "store", input_dir, heartbeat_s=HEARTBEAT_S)
    try:
        async with Client(build_server(state)) as client:
            plain = await client.call_tool("generate", CALL)
            plain_ids = [i["image_id"] for i in plain.structured_content["images"]]

            heard: list[tuple[float, float, str]] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                heard.append((time.monotonic(), value, message or ""))

            with SlowDecoder(tiny_pipeline, delay_s=0.8) as slow:
                slowed = await client.call_tool("generate", CALL, progress_callback=on_progress)
            assert not slowed.is_error
            slowed_ids = [i["image_id"] for i in slowed.structured_content["images"]]
            assert await _pixels(client, slowed_ids) == await _pixels(client, plain_ids), "same pixels"
    finally:
        state.engine.close()
        state.store.close()

    assert len(slow.windows) == 2, "one decode per picture"
    values = [v for _, v, _ in heard]
    assert values == sorted(values) and len(set(values)) == len(values), "values rise strictly"
    for k, (start, end) in enumerate(slow.windows, start=1):
        during = [(t, v, m) for t, v, m in heard if start < t < end]
        # 0.8 s at one heartbeat per 0.1 s: about 8; a loaded 2-core machine may delay some
        assert len(during) >= 3, (k, during)
        assert all("still working" in m and f"image {k}/2: step 4/4" in m for _, _, m in during), during
        assert all(int(v) == int(during[0][1]) for _, v, _ in during), "heartbeats stay below the next unit"
    decoded = [m for _, _, m in heard if m.endswith("decoded") and not m.startswith("still working")]
    assert decoded == ["image 1/2: decoded", "image 2/2: decoded"], "a report after each picture's decode"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(heard)]
    assert max(gaps) < 0.8, f"never silent for a whole decode: the longest gap was {max(gaps):.2f} s"


async def test_the_engine_beats_through_a_long_unit_and_stops_at_the_span() -> None:
    """Any long unit, not only the decode: a step of the fake that takes 0.6 s still gets heartbeats, and they
    never reach the next whole unit however long it lasts."""
    fake = FakeGenerator(step_delay_s=0.6)
    engine = Engine(lambda: fake, heartbeat_s=0.05)
    engine.start()
    assert engine.wait_loaded(10) == EngineState.READY
    heard: list[tuple[float, str]] = []

    async def progress(value: float, total: float | None, message: str) -> None:
        heard.append((value, message))

    from klein_agent.rules.requests import GenerationRequest

    await engine.run(GenerationRequest("slow steps", 64, 64, seed=1, steps=2), progress=progress)
    await engine.aclose()
    values = [v for v, _ in heard]
    assert values == sorted(values) and len(set(values)) == len(values)
    beats = [(v, m) for v, m in heard if m.startswith("still working")]
    assert len(beats) >= 10, heard
    assert any(m.endswith("after: encoding prompt") for _, m in beats)
    assert all(v - int(v) < HEARTBEAT_SPAN for v, _ in beats)


async def test_a_slow_load_is_never_silent_for_long() -> None:
    """Loading weights for many heartbeats: the values keep rising (the old 0.99 cap went silent after 99)."""
    release = threading.Event()
    fake = FakeGenerator()

    def slow_load() -> FakeGenerator:
        release.wait(10)
        return fake

    engine = Engine(slow_load, heartbeat_s=0.01)
    engine.start()
    heard: list[float] = []

    async def progress(value: float, total: float | None, message: str) -> None:
        heard.append(value)
        if len(heard) == 150:
            release.set()

    from klein_agent.rules.requests import GenerationRequest

    with anyio.fail_after(30):
        await engine.run(GenerationRequest("after a slow load", 64, 64, seed=1), progress=progress)
    await engine.aclose()
    assert len([v for v in heard if v < 1]) >= 150 and heard == sorted(set(heard))
