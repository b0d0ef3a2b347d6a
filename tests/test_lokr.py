"""LoKr updates: the Kronecker product applied without being formed, against peft's own LoKr arithmetic; and LoKr
files through the real CLI (`--lora FILE:SCALE`) and a real `serve` process with the official MCP client.

The layer math is checked against peft `tuners/lokr/layer.py` (`make_kron`, then `F.linear`, what diffusers runs),
in float64 and float32, with the tolerance from tests/tolerances.py (the float32 reference's own rounding on this
CPU); a factor transposed or the thirds' rows moved must fail it.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mcp import Client, StdioServerParameters
from peft.tuners.lokr.layer import make_kron
from PIL import Image
from safetensors.torch import save_file

from klein_agent.model.lora import Kronecker, KroneckerPiece, LoRALinear, activate, attach, merge
from tests.http_helpers import REPO, serve_args
from tests.test_server_tools import ids_of, read_meta, read_png
from tests.tolerances import rounding_bound


def _factors(g: torch.Generator, a: int, b: int, c: int, d: int, rank: int, dtype: torch.dtype) -> tuple:
    w1 = (torch.randn(a, c, generator=g, dtype=dtype),)
    if rank:
        w2 = (torch.randn(b, rank, generator=g, dtype=dtype), torch.randn(rank, d, generator=g, dtype=dtype))
    else:
        w2 = (torch.randn(b, d, generator=g, dtype=dtype),)
    return w1, w2


def _product(chain: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return chain[0] if len(chain) == 1 else chain[0] @ chain[1]


def _peft_delta(update: Kronecker, x: torch.Tensor) -> torch.Tensor:
    """peft's arithmetic: make_kron(w1, w2) per piece, placed in its rows, rolled, then F.linear."""
    in_features = x.shape[-1]
    w = torch.zeros(update.out_features, in_features, dtype=x.dtype)
    for p in update.pieces:
        w[p.start : p.start + p.rows] = make_kron(_product(p.w1), _product(p.w2))
    return torch.nn.functional.linear(x, torch.roll(w, update.roll, dims=0))


def _update(dtype: torch.dtype, rank: int, thirds: bool, roll: bool) -> Kronecker:
    g = torch.Generator().manual_seed(rank * 4 + thirds * 2 + roll)
    # in = 6 * 8 = 48; a whole layer of out 4 * 15 = 60, or thirds of 20 = 4 * 5 each (q and v only)
    if thirds:
        pieces = tuple(KroneckerPiece(start, *_factors(g, 4, 5, 6, 8, rank, dtype)) for start in (0, 40))
        return Kronecker(pieces, 60)
    return Kronecker((KroneckerPiece(0, *_factors(g, 4, 15, 6, 8, rank, dtype)),), 60, 30 if roll else 0)


@pytest.mark.parametrize(
    ("rank", "thirds", "roll"), [(0, False, False), (3, False, False), (0, True, False), (2, False, True)]
)
def test_the_kronecker_update_is_peft_s_without_forming_the_product(
    rank: int, thirds: bool, roll: bool
) -> None:
    x64 = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    u64 = _update(torch.float64, rank, thirds, roll)
    u32 = u64.to(torch.device("cpu"), torch.float32)
    x32 = x64.float()
    bound = rounding_bound("LoKr delta", _peft_delta(u64, x64), _peft_delta(u32, x32))
    bound.check(u32.delta(x32))
    # the self-checks: the factors in the other order, and the rows of the first piece one row down
    swapped = Kronecker(tuple(KroneckerPiece(p.start, p.w2, p.w1) for p in u32.pieces), 60, u32.roll)
    bound.check_catches(swapped.delta(x32), "factors swapped (w2 ⊗ w1: the same shape)")
    bound.check_catches(torch.roll(u32.delta(x32), 1, dims=-1), "rows moved by one")
    assert torch.allclose(u64.matrix().double(), _peft_delta(u64, torch.eye(48, dtype=torch.float64)).T)


def test_a_lokr_layer_switches_per_call_and_merges_to_the_same_output() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 60, bias=True)
    model = torch.nn.Sequential(base)
    x = torch.randn(5, 48)
    w64, b64 = base.weight.detach().double(), base.bias.detach().double()
    u64 = _update(torch.float64, 2, True, False)
    u32 = u64.to(torch.device("cpu"), torch.float32)
    plain = model(x).detach()
    attach(model, "k", {"0": u32})
    assert isinstance(model[0], LoRALinear)
    activate(model, (("k", 0.5),))
    unfused = model(x).detach()
    # peft's LoKr Linear: base output plus F.linear(x, make_kron(w1, w2) * scale)
    want64 = torch.nn.functional.linear(x.double(), w64, b64) + 0.5 * _peft_delta(u64, x.double())
    want32 = plain + 0.5 * _peft_delta(u32, x)
    bound = rounding_bound("LoKr layer at scale 0.5", want64, want32)
    bound.check(unfused)
    bound.check_catches(plain + 0.4 * _peft_delta(u32, x), "scale 0.4")
    activate(model, ())
    assert torch.equal(model(x), plain)  # off again: the base weights untouched
    merge(model, (("k", 0.5),))
    bound.check(model(x).detach())


def lokr_for_tiny(path: Path, seed: int) -> Path:
    """A LyCORIS file for the tiny preset (hidden 64): to_q and to_v of the first double block, w2 decomposed."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("transformer_blocks_0_attn_to_q", "transformer_blocks_0_attn_to_v"):
        tensors[f"lycoris_{name}.lokr_w1"] = torch.randn(8, 8, generator=g) / 8
        tensors[f"lycoris_{name}.lokr_w2_a"] = torch.randn(8, 2, generator=g)
        tensors[f"lycoris_{name}.lokr_w2_b"] = torch.randn(2, 8, generator=g)
        tensors[f"lycoris_{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def _generate(tmp_path: Path, out: str, *extra: str) -> bytes:
    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", "tiny", "--prompt", "a red cube"]
    argv += ["--width", "64", "--height", "64", "--seed", "3", "--out", str(tmp_path / out), *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return (tmp_path / out).read_bytes()


def _pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.tobytes()


@pytest.mark.slow
def test_the_cli_runs_a_lokr_file_at_its_scale(tmp_path: Path) -> None:
    path = lokr_for_tiny(tmp_path / "ink.safetensors", seed=1)
    plain = _pixels(_generate(tmp_path, "plain.png"))
    assert _pixels(_generate(tmp_path, "styled.png", "--lora", f"{path}:0.8")) != plain
    assert _pixels(_generate(tmp_path, "off.png", "--lora", f"{path}:0")) == plain  # scale 0 runs none


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_serve_lists_runs_and_reruns_a_lokr_adapter(tmp_path: Path) -> None:
    path = lokr_for_tiny(tmp_path / "ink.safetensors", seed=2)
    params = StdioServerParameters(
        command=sys.executable, args=serve_args(tmp_path / "store", "--lora", f"{path}:0.7"), cwd=REPO
    )
    args = {"prompt": "a cube", "width": 64, "height": 64, "seed": 1}
    async with Client(params) as client:
        ids = []
        for loras in ([], [{"name": "ink"}], [{"name": "ink", "scale": 1.5}]):
            ids += ids_of(await client.call_tool("generate", {**args, "loras": loras} if loras else args))
        status = await client.call_tool(
            "server_status", {}
        )  # the model (and its adapters) loads at the first call
        assert status.structured_content["model"]["loras"] == [{"name": "ink", "scale": 0.7}]
        pixels = [_pixels(await read_png(client, image_id)) for image_id in ids]
        assert len(set(pixels)) == 3  # off, 0.7 and 1.5 are three pictures
        meta = await read_meta(client, ids[2])
        assert meta["recipe"]["loras"] == [{"name": "ink", "scale": 1.5}]
        again = ids_of(await client.call_tool("generate", meta["rerun"]["arguments"]))[0]
        assert _pixels(await read_png(client, again)) == pixels[2]
