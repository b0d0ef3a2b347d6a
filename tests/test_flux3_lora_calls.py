"""FLUX 3 [klein] LoRA adapters per call (issue 21, point 3): loaded with the model (`load_pipeline(loras=...)`,
`--lora FILE[:SCALE]`), attached unfused, and run only by the calls that name them, at their scales, as FLUX.2 does.

Parity: diffusers' modular pipeline with its own `load_lora_weights` and `set_adapters(name, 0.8)`, called with its
defaults otherwise (upsampler block removed on both sides), ≥ 45 dB on the 8-bit pictures; the same call without the
adapter must be far from it, so the equality says the adapter runs at that scale. Over a real MCP client (`serve
--lora`) and the CLI (`generate --lora`): the recipe records the adapter and scale and its rerun gives the same PNG
bytes. A FLUX.2 adapter given to a FLUX 3 model is refused naming the file and the key.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from flux3_reference_checkpoints import load_flux3_reference, write_flux3_checkpoint
from mcp import Client, StdioServerParameters
from PIL import Image
from test_flux3_lora import DIFFUSERS_LAYERS, write
from test_pipeline_parity import MIN_PSNR_DB, psnr

from klein_agent.loading.errors import LoRAError
from klein_agent.pipeline import load_pipeline
from klein_agent.pipeline.flux3 import Flux3Pipeline
from klein_agent.rules.requests import GenerationRequest
from klein_agent.service.pngfile import PROVENANCE_KEY

pytestmark = pytest.mark.slow  # whole FLUX 3 pipelines, in subprocesses and against diffusers

REPO = Path(__file__).resolve().parents[1]
PROMPT, SEED, SCALE = "a lighthouse on a cliff at dusk", 7, 0.8
SIZE = {"height": 64, "width": 96}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flux3_checkpoint(tmp_path_factory.mktemp("flux3") / "klein")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # diffusers/PEFT names with alpha in the metadata, as diffusers' save_lora_weights writes them
    return write(
        tmp_path_factory.mktemp("lora") / "style.safetensors", DIFFUSERS_LAYERS, "transformer.", 3, 8.0
    )


@pytest.fixture(scope="module")
def reference(folder: Path, adapter: Path) -> Image.Image:
    """diffusers' picture with the adapter at SCALE: its own loader, its own adapter scaling."""
    pipe = load_flux3_reference(folder, distilled=True)
    pipe.load_lora_weights(str(adapter), adapter_name="style")
    pipe.set_adapters("style", SCALE)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), output="images", **SIZE)[0]  # type: ignore[no-any-return]


def _rgb(data: bytes | Path) -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return image.convert("RGB")


def test_a_call_runs_the_adapter_it_names_at_its_scale_as_diffusers_does(
    folder: Path, adapter: Path, reference: Image.Image
) -> None:
    ours = load_pipeline(str(folder), loras=[(str(adapter), 1.0)])
    assert isinstance(ours, Flux3Pipeline) and ours.info.loras == (("style", 1.0),)
    request = GenerationRequest(PROMPT, seed=SEED, loras=(("style", SCALE),), **SIZE)
    made = ours.generate(request)
    db = psnr(made.images[0], reference)
    assert made.recipe(0)["loras"] == [{"name": "style", "scale": SCALE}]
    # a call naming no adapter runs none (the recipe without adapters remakes its picture anywhere)
    plain = ours.generate(GenerationRequest(PROMPT, seed=SEED, **SIZE))
    without = psnr(plain.images[0], reference)
    at_one = psnr(
        ours.generate(GenerationRequest(PROMPT, seed=SEED, loras=(("style", None),), **SIZE)).images[0],
        reference,
    )
    print(f"adapter at {SCALE}: {db:.1f} dB; without it {without:.1f} dB; at its default 1.0 {at_one:.1f} dB")
    assert db >= MIN_PSNR_DB
    assert without < MIN_PSNR_DB and at_one < MIN_PSNR_DB  # both would pass if the scale were not applied
    assert "loras" not in plain.recipe(0)
    again = ours.generate(request)  # switching adapters per call leaves nothing behind: byte-exact
    assert again.images[0].tobytes() == made.images[0].tobytes()


def test_a_flux2_adapter_is_refused_naming_file_and_key(folder: Path, tmp_path: Path) -> None:
    flux2 = write(
        tmp_path / "flux2.safetensors", {"transformer_blocks.0.attn.to_q": (32, 32)}, "transformer.", 1
    )
    with pytest.raises(
        LoRAError, match=r"flux2\.safetensors.*transformer\.transformer_blocks\.0\.attn\.to_q"
    ):
        load_pipeline(str(folder), loras=[(str(flux2), 1.0)])
    # serve's choice: the bad adapter is left out and listed, the model still loads
    pipeline = load_pipeline(str(folder), loras=[(str(flux2), 1.0)], skip_bad_loras=True)
    assert pipeline.info.loras == () and [n for n, _ in pipeline.info.unloaded_loras] == ["flux2"]


def _recipe(png: bytes | Path) -> dict[str, Any]:
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as image:
        return json.loads(image.text[PROVENANCE_KEY])  # type: ignore[attr-defined,no-any-return]


def test_generate_lora_on_the_cli_records_it_and_reruns_byte_exact(
    folder: Path, adapter: Path, reference: Image.Image, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(lora: str, out: Path) -> None:
        argv = [sys.executable, "-m", "klein_agent", "generate", "--model", str(folder), "--prompt", PROMPT]
        argv += ["--seed", str(SEED), "--width", "96", "--height", "64", "--lora", lora, "--out", str(out)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr

    cli(f"{adapter}:{SCALE}", tmp_path / "a.png")
    assert psnr(_rgb(tmp_path / "a.png"), reference) >= MIN_PSNR_DB
    recipe = _recipe(tmp_path / "a.png")
    assert recipe["loras"] == [{"name": "style", "scale": SCALE}]
    cli(f"{adapter}:{SCALE}", tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _png(client: Client, image_id: str) -> bytes:
    contents = (await client.read_resource(f"image://{image_id}")).contents
    return base64.b64decode(contents[0].blob)  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_serve_lora_runs_a_calls_adapters_over_mcp_and_reruns_them(
    folder: Path, adapter: Path, reference: Image.Image, tmp_path: Path
) -> None:
    args = ["-m", "klein_agent", "serve", "--model", str(folder), "--store", str(tmp_path / "store")]
    args += ["--no-default-dirs", "--lora", str(adapter)]
    server = StdioServerParameters(
        command=sys.executable, args=args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    async with Client(server) as client:
        call = {"prompt": PROMPT, "seed": SEED, **SIZE}
        made = await client.call_tool("generate", {**call, "loras": [{"name": "style", "scale": SCALE}]})
        assert not made.is_error, made.content
        image_id = made.structured_content["images"][0]["image_id"]
        png = await _png(client, image_id)
        db = psnr(_rgb(png), reference)
        print(f"server with the adapter at {SCALE}: {db:.1f} dB against diffusers")
        assert db >= MIN_PSNR_DB
        assert _recipe(png)["loras"] == [{"name": "style", "scale": SCALE}]
        meta = json.loads((await client.read_resource(f"image://{image_id}/meta")).contents[0].text)  # type: ignore[union-attr]
        rerun = meta["rerun"]
        assert rerun["arguments"]["loras"] == [{"name": "style", "scale": SCALE}]
        again = await client.call_tool(rerun["name"], rerun["arguments"])
        assert not again.is_error, again.content
        assert await _png(client, again.structured_content["images"][0]["image_id"]) == png
        # a call naming no adapter runs none; one naming an adapter not loaded is refused, the server goes on
        plain = await client.call_tool("generate", call)
        assert (
            psnr(_rgb(await _png(client, plain.structured_content["images"][0]["image_id"])), reference)
            < MIN_PSNR_DB
        )
        unknown = await client.call_tool("generate", {**call, "loras": [{"name": "other"}]})
        assert unknown.is_error and "no LoRA adapter named 'other' is loaded; loaded: style" in str(
            unknown.content
        )
