"""LoRA adapters in the server, through a real in-process MCP client: listed in server_status, chosen per call,
recorded in the recipe (which reruns to the same bytes), and bad choices refused before the model runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mcp import Client
from safetensors.torch import save_file

from klein_agent.server.app import build_server
from tests.conftest import SpyGenerator, make_server_state
from tests.test_server_tools import call, ids_of, read_meta, read_png

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tiny_lora(path: Path, seed: int) -> Path:
    """An ai-toolkit file for the tiny preset's first double block's image q/k/v."""
    from klein_agent.model.configs import preset

    d = preset("tiny").transformer.hidden_size
    g = torch.Generator().manual_seed(seed)
    save_file(
        {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, d, generator=g)
            * d**-0.5,
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * d, 4, generator=g),
        },
        str(path),
    )
    return path


@pytest.fixture
def lora_state(tmp_path: Path, input_dir: Path) -> Iterator[tuple[Any, SpyGenerator]]:
    from klein_agent.pipeline import load_pipeline

    files = [
        (str(tiny_lora(tmp_path / "style.safetensors", 1)), 0.8),
        (str(tiny_lora(tmp_path / "ink.safetensors", 2)), 1.0),
    ]
    spy = SpyGenerator(load_pipeline("tiny", loras=files))
    state = make_server_state(lambda: spy, tmp_path / "store", input_dir)
    yield state, spy
    state.engine.close()
    state.store.close()


@pytest.fixture
async def lora_client(lora_state: tuple[Any, SpyGenerator]) -> AsyncIterator[Client]:
    async with Client(build_server(lora_state[0])) as connected:
        yield connected


async def test_adapters_are_listed_chosen_per_call_and_recorded(lora_client: Client) -> None:
    client = lora_client
    args = {"prompt": "a red cube", "width": 64, "height": 64, "seed": 3}
    plain = ids_of(await call(client, "generate", args))[0]
    status = (await call(client, "server_status", {})).structured_content
    assert status["model"]["loras"] == [{"name": "style", "scale": 0.8}, {"name": "ink", "scale": 1.0}]
    styled = ids_of(await call(client, "generate", {**args, "loras": [{"name": "style"}]}))[0]
    both = ids_of(
        await call(client, "generate", {**args, "loras": [{"name": "style"}, {"name": "ink", "scale": -0.5}]})
    )[0]
    pictures = [await read_png(client, i) for i in (plain, styled, both)]
    assert len(set(pictures)) == 3
    meta = await read_meta(client, both)
    assert meta["recipe"]["loras"] == [{"name": "style", "scale": 0.8}, {"name": "ink", "scale": -0.5}]
    assert "loras" not in (await read_meta(client, plain))["recipe"]
    again = ids_of(await call(client, "generate", meta["rerun"]["arguments"]))[0]
    assert await read_png(client, again) == pictures[2]
    # switching back and forth leaves the base weights as they were
    assert await read_png(client, ids_of(await call(client, "generate", args))[0]) == pictures[0]


async def test_bad_adapter_choices_are_refused_before_the_model(
    lora_client: Client, lora_state: tuple[Any, SpyGenerator]
) -> None:
    _, spy = lora_state
    p = {"prompt": "x", "width": 64, "height": 64}
    cases = [
        ({**p, "loras": [{"name": "nope"}]}, "no LoRA adapter named 'nope' is loaded; loaded: style, ink"),
        ({**p, "loras": [{"name": "style"}, {"name": "style"}]}, "given twice"),
        ({**p, "loras": [{"name": "style", "scale": 9}]}, "scale"),
    ]
    for args, expected in cases:
        result = await lora_client.call_tool("generate", args)
        assert result.is_error and expected in result.content[0].text, result.content[0].text
    assert spy.calls == []
