"""Hostile LoRA files (tests/lora_hostile.py) are refused at load with one error type naming the file, the key and
the fix: in-process for every file, through the real CLI (exit 2) and the real `serve` (the server stays up and
serves the other adapter) for a few, and the sparse 10 GiB file with bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mcp import Client, StdioServerParameters
from safetensors.torch import save_file

from klein_agent.loading.lora import LoRAError, read_lora
from klein_agent.loading.random_init import build_tiny
from klein_agent.rules.loras import MAX_LORA_SCALE
from tests.http_helpers import REPO, serve_args
from tests.lora_hostile import CASES, A, B, pair, sound

FIX_MARK = "; "  # the message's problem and fix are joined by "; " (LoRAError)


@pytest.fixture(scope="module")
def tiny_transformer() -> torch.nn.Module:
    return build_tiny()[0]


def test_the_set_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_each_hostile_file_is_refused_naming_file_key_and_fix(
    case: str, tiny_transformer: torch.nn.Module, tmp_path: Path
) -> None:
    build, key = CASES[case]
    path = tmp_path / "adapter.safetensors"
    build(path)
    with pytest.raises(LoRAError) as refused:
        read_lora(path, tiny_transformer, max_scale=MAX_LORA_SCALE)
    message = str(refused.value)
    assert message.startswith(f"LoRA {path}"), message
    assert FIX_MARK in message and not message.endswith(FIX_MARK), message
    if key is not None:
        assert f"key {key!r}" in message, message


def test_the_sound_file_they_vary_loads(tiny_transformer: torch.nn.Module, tmp_path: Path) -> None:
    adapter = read_lora(sound(tmp_path / "ok.safetensors"), tiny_transformer, max_scale=MAX_LORA_SCALE)
    assert list(adapter.updates) == ["double_blocks.0.img_attn.proj"] and adapter.rank == 4


RSS_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from klein_agent.loading.lora import LoRAError, read_lora
    from klein_agent.loading.random_init import build_tiny
    from klein_agent.rules.loras import MAX_LORA_SCALE
    model = build_tiny()[0]
    read_lora(sys.argv[2], model, max_scale=MAX_LORA_SCALE)  # a sound file first: every code path warm before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        read_lora(sys.argv[1], model, max_scale=MAX_LORA_SCALE)
        outcome = "loaded"
    except LoRAError as exc:
        outcome = str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the most a file fitting this model's shapes may hold: full rank (min(in, out)) on every linear, in float32,
    # read once in the file's dtype (up to float64) and once converted
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    bound = sum((m.in_features + m.out_features) * min(m.in_features, m.out_features) for m in linears) * (8 + 4)
    print(json.dumps({"growth": after - before, "bound": bound, "outcome": outcome}))
    """
)


def test_a_sparse_file_declaring_10_gib_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    build, _ = CASES["sparse 10 GiB up"]
    hostile = tmp_path / "sparse.safetensors"
    build(hostile)
    assert hostile.stat().st_size > 10 * 1024**3 - 1 and hostile.stat().st_blocks * 512 < 1024**2
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(hostile), str(sound(tmp_path / "ok.safetensors"))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert str(hostile) in found["outcome"] and "do not fit layer" in found["outcome"], found
    assert 0 <= found["growth"] <= found["bound"], found


CLI_CASES = ["truncated data", "rank 0", "NaN weights", "metadata 100k deep", "alpha boolean"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_the_cli_exits_2_naming_the_file(case: str, tmp_path: Path) -> None:
    build, key = CASES[case]
    path = tmp_path / "hostile.safetensors"
    build(path)
    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", "tiny", "--prompt", "x"]
    argv += ["--width", "64", "--height", "64", "--lora", str(path), "--out", str(tmp_path / "o.png")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and f"LoRA {path}" in done.stderr, done.stderr
    if key is not None:
        assert key in done.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_serve_keeps_running_without_the_bad_adapter(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    CASES["rank 0"][0](bad)
    good = sound(tmp_path / "style.safetensors")
    params = StdioServerParameters(
        command=sys.executable,
        args=serve_args(tmp_path / "store", "--lora", str(bad), "--lora", str(good)),
        cwd=REPO,
    )
    args = {"prompt": "a cube", "width": 64, "height": 64, "seed": 1}
    async with Client(params) as client:
        plain = await client.call_tool("generate", args)
        assert not plain.is_error, plain.content
        styled = await client.call_tool("generate", {**args, "loras": [{"name": "style"}]})
        assert not styled.is_error, styled.content
        refused = await client.call_tool("generate", {**args, "loras": [{"name": "broken"}]})
        text = refused.content[0].text  # type: ignore[union-attr]
        assert refused.is_error and "could not be loaded" in text and str(bad) in text, text
        status = await client.call_tool("server_status", {})
        assert [a["name"] for a in status.structured_content["model"]["loras"]] == ["style"]


def test_a_float64_file_within_range_loads(tiny_transformer: torch.nn.Module, tmp_path: Path) -> None:
    """The dtype checks refuse what is no real number, not the widths trainers use."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        path = tmp_path / f"{dtype}.safetensors"
        down = (torch.randn(4, 64, generator=g) / 8).to(dtype)
        save_file(
            {
                "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": down,
                "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(64, 4, generator=g).to(
                    dtype
                )
                / 10,
                "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2, dtype=torch.int64),
            },
            str(path),
        )
        assert read_lora(path, tiny_transformer, max_scale=MAX_LORA_SCALE).rank == 4


@pytest.mark.parametrize(
    ("metadata", "warned"),
    [
        ({"ss_base_model_version": "flux1"}, True),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, True),
        ({"base_model": "black-forest-labs/FLUX.2-klein-9B"}, True),
        ({"modelspec.architecture": "flux-2-klein-4b/lora"}, False),
        ({"base_model": "black-forest-labs/FLUX.2-klein-base-4B"}, False),  # trained on Base, run distilled
        ({}, False),
    ],
)
def test_an_adapter_trained_for_another_model_is_loaded_with_a_warning(
    metadata: dict[str, str],
    warned: bool,
    tiny_transformer: torch.nn.Module,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "other.safetensors"
    down, up = pair()
    save_file({A: down, B: up}, str(path), metadata=metadata)
    with caplog.at_level("WARNING", logger="klein_agent.loading.lora"):
        read_lora(path, tiny_transformer, "klein-4b", max_scale=MAX_LORA_SCALE)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warnings) == warned, warnings
    if warned:
        assert str(path) in warnings[0] and next(iter(metadata.values())) in warnings[0]
