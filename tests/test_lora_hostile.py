"""Hostile LoRA and LoKr files (tests/lora_hostile.py) are refused at load with one error type naming the file, the
key and the fix: in-process for every file, through the real CLI (exit 2) and the real `serve` (the server stays up
and serves the other adapter) for a few, and the sparse files (10 GiB of LoRA, 2 GiB of LoKr factors declaring a
2^28-square product) with bounded memory. LoKr refusals also say what is wrong with the factors."""

from __future__ import annotations

import json
import re
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
from klein_agent.model.lora import Kronecker
from klein_agent.rules.loras import MAX_LORA_SCALE
from tests.http_helpers import REPO, serve_args
from tests.lora_hostile import AT, CASES, A, B, factors, pair, sound

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


# what each LoKr refusal must say, beyond naming the key (the code before LoKr said "not a LoRA weight" to all)
LOKR_PROBLEMS = {
    "LoKr w1 without w2": "has no lokr_w2 (nor both lokr_w2_a and lokr_w2_b)",
    "LoKr w2_a without w2_b": "has no lokr_w2 (nor both lokr_w2_a and lokr_w2_b)",
    "LoKr w1 whole and decomposed": "gives w1 both whole and decomposed",
    "LoKr w1 x w2 not the layer's shape": "w1 [8, 8] ⊗ w2 [8, 9] is a [64, 72] update, but layer",
    "LoKr factors of another model's width": "is a [64, 3072] update, but layer double_blocks.0.img_attn.proj maps 64",
    "LoKr product far beyond the model, sparse": "is a [268435456, 268435456] update",
    "LoKr rank above its factor": "at rank 9, above its smaller side 8",
    "LoKr ranks that differ": "disagree on the rank (2 and 3)",
    "LoKr 3-D factor (a Tucker core)": "shape [8, 8, 1] is not a matrix",
    "LoKr Tucker key": "a LoKr file holds only lokr_w1",
    "LoKr and LoRA keys in one file": "a LoKr file holds only lokr_w1",
    "LoKr float8 factor": "F8_E4M3 is float8",
    "LoKr NaN factor": "NaN or infinite",
    "LoKr infinite decomposed factor": "NaN or infinite",
    "LoKr 1e30 factor": "float16's range",
    "LoKr alpha 1e38 on a decomposition": "float16's range",
    "LoKr alpha NaN": "alpha must be a positive number",
    "LoKr alpha a vector": "not one number",
    "LoKr unknown layer": "names no layer of this model; the LoKr is for another model",
    "LyCORIS unknown sub-path": "names no layer of this model; the LoKr is for another model",
    "LyCORIS block beyond the model": "names no layer of this model; the LoKr is for another model",
    "LyCORIS key without its prefix": "LyCORIS LoKr layout but this key is not",
    "LoKr without a layout's prefix": "the key is in no LoKr layout we read",
    "LoKr alpha in diffusers layout": "diffusers LoKr files carry no alpha tensor",
}


def test_every_lokr_case_has_its_problem() -> None:
    assert set(LOKR_PROBLEMS) == {case for case in CASES if case.startswith(("LoKr", "LyCORIS"))}


@pytest.mark.parametrize("case", list(LOKR_PROBLEMS))
def test_each_lokr_refusal_says_what_is_wrong(
    case: str, tiny_transformer: torch.nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "adapter.safetensors"
    CASES[case][0](path)
    with pytest.raises(LoRAError, match=re.escape(LOKR_PROBLEMS[case])):
        read_lora(path, tiny_transformer, max_scale=MAX_LORA_SCALE)


@pytest.mark.parametrize("rank", [0, 2])
def test_the_sound_lokr_files_they_vary_load(
    rank: int, tiny_transformer: torch.nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "ok.safetensors"
    save_file(factors(rank=rank) | {f"{AT}.alpha": torch.tensor(4.0)}, str(path))
    adapter = read_lora(path, tiny_transformer, max_scale=MAX_LORA_SCALE)
    assert adapter.format == "BFL LoKr" and list(adapter.updates) == ["double_blocks.0.img_attn.proj"]
    update = adapter.updates["double_blocks.0.img_attn.proj"]
    assert isinstance(update, Kronecker) and len(update.pieces[0].w2) == (2 if rank else 1)


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


@pytest.mark.parametrize(
    ("case", "declared", "problem"),
    [
        ("sparse 10 GiB up", 10 * 1024**3, "do not fit layer"),
        ("LoKr product far beyond the model, sparse", 2 * 1024**3, "update, but layer"),
    ],
)
def test_a_sparse_file_declaring_gigabytes_is_refused_with_bounded_memory(
    case: str, declared: int, problem: str, tmp_path: Path
) -> None:
    build, _ = CASES[case]
    hostile = tmp_path / "sparse.safetensors"
    build(hostile)
    assert hostile.stat().st_size > declared - 1 and hostile.stat().st_blocks * 512 < 1024**2
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(hostile), str(sound(tmp_path / "ok.safetensors"))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert str(hostile) in found["outcome"] and problem in found["outcome"], found
    assert 0 <= found["growth"] <= found["bound"], found


CLI_CASES = [
    "truncated data",
    "rank 0",
    "NaN weights",
    "metadata 100k deep",
    "alpha boolean",
    "LoKr w1 x w2 not the layer's shape",
    "LoKr NaN factor",
]


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
