"""The step cache as callers use it: `--step-cache` on the CLI, `cache` over MCP (a real `serve` subprocess and the
official SDK client), recorded in the recipe so that a rerun makes the same bytes, and off unless asked for.

Parity with diffusers' own hook is tests/test_step_cache_parity.py; these run the tiny model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mcp import Client, StdioServerParameters

from klein_agent.model import sampling
from klein_agent.model.step_cache import MagCache
from klein_agent.rules import limits
from klein_agent.rules.recipes import rerun_call, rerun_command
from klein_agent.rules.requests import GenerationRequest
from klein_agent.rules.resolution import RequestError
from klein_agent.rules.step_caches import StepCache, check_step_cache, from_recipe, parse_step_cache_argument
from tests.http_helpers import REPO, serve_args
from tests.test_cli_generate import provenance
from tests.test_cli_generate import run as run_cli
from tests.test_server_tools import call, ids_of, read_meta, read_png

CACHE = {"kind": "magcache", "threshold": 0.5}  # skips often on the tiny model's 20 steps
STEPS = 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the rule's limits and messages ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("magcache:0", "step cache: threshold must be above 0 and at most 1"),
        ("magcache:1.5", "step cache: threshold must be above 0 and at most 1"),
        ("magcache:nan", "step cache: threshold must be a finite number, got NaN"),
        ("magcache:x", "--step-cache magcache:x: the threshold 'x' is not a number (KIND[:THRESHOLD]"),
        ("firstblock", "step cache: kind must be one of magcache, got 'firstblock'"),
    ],
)
def test_bad_settings_are_refused_naming_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_step_cache_argument(text)
    assert str(caught.value).startswith(message), caught.value


def test_settings_read_alike_from_the_cli_a_call_and_a_recipe() -> None:
    default = StepCache("magcache", limits.STEP_CACHE_DEFAULT_THRESHOLD)
    assert parse_step_cache_argument("magcache") == default == from_recipe({"kind": "magcache"})
    assert parse_step_cache_argument("magcache:0.25") == check_step_cache("magcache", 0.25)
    assert from_recipe(StepCache("magcache", 0.25).as_dict()) == StepCache("magcache", 0.25)
    with pytest.raises(RequestError) as caught:
        from_recipe({"kind": "magcache", "treshold": 0.1})
    assert 'give {"kind": one of magcache, "threshold": a number}' in str(caught.value)


def test_a_recipe_with_a_cache_reruns_with_it_from_mcp_and_the_cli() -> None:
    recipe = {"tool": "generate", "prompt": "p", "seed": 1, "width": 64, "height": 64, "steps": 20}
    recipe |= {"guidance": None, "model": "tiny", "cache": dict(CACHE)}
    assert rerun_call(recipe, [])["arguments"]["cache"] == CACHE  # type: ignore[index]
    argv = rerun_command(recipe, [], "out.png")
    assert argv is not None and argv[argv.index("--step-cache") + 1] == "magcache:0.5"
    assert parse_step_cache_argument("magcache:0.5").as_dict() == CACHE
    plain = {key: value for key, value in recipe.items() if key != "cache"}
    assert "cache" not in rerun_call(plain, [])["arguments"]  # type: ignore[index]
    assert "--step-cache" not in (rerun_command(plain, [], "out.png") or [])


def test_the_cli_option_fills_the_calls_step_cache_for_every_kind_of_call() -> None:
    """`--step-cache` becomes the call's field in `image_call`; the call's check then judges it as the server's
    does, and a threshold that is no number is refused before any call is built."""
    from klein_agent.cli import build_parser, image_call

    fixed = ["--model", "tiny", "--prompt", "a cube", "--out", "o.png"]

    def call_of(*extra: str) -> Any:
        return image_call(build_parser().parse_args(["generate", *fixed, *extra]))

    assert call_of().step_cache is None
    assert call_of("--step-cache", "magcache").step_cache == ("magcache", None)
    masked = call_of("--image", "a.png", "--box", "0,0,0.5,0.5", "--step-cache", "magcache:0.25")
    assert masked.tool == "inpaint" and masked.step_cache == ("magcache", 0.25)
    with pytest.raises(RequestError, match="step cache: threshold must be above 0 and at most 1"):
        call_of("--image", "a.png", "--image", "b.png", "--step-cache", "magcache:2").check()
    with pytest.raises(RequestError, match="--step-cache magcache:x: the threshold 'x' is not a number"):
        call_of("--step-cache", "magcache:x")


# -- the rule in the loop ----------------------------------------------------------------------------------------
def test_no_step_is_skipped_early_or_more_than_the_limit_in_a_row() -> None:
    """Drive one pass over 50 steps with a generous threshold: the first 20% always run, runs of skips stay within
    MAGCACHE_MAX_SKIP_STEPS, and a pass that ended starts over with nothing cached."""
    cache = MagCache(
        1.0,
        50,
        max_skip_steps=limits.MAGCACHE_MAX_SKIP_STEPS,
        retention_ratio=limits.MAGCACHE_RETENTION_RATIO,
    )
    one = cache.pass_cache("cond")
    start, out = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    skips = []
    for _ in range(50):
        skipped = one.skip()
        skips.append(skipped)
        if skipped:
            assert torch.equal(one.reuse(start), out)  # start + the residual kept at the last computed step
        else:
            one.keep(start, out)
    retention = int(limits.MAGCACHE_RETENTION_RATIO * 50 + 0.5)
    assert not any(skips[:retention]) and any(skips[retention:])
    longest = max(len(run) for run in "".join("s" if s else "." for s in skips).split("."))
    assert longest == limits.MAGCACHE_MAX_SKIP_STEPS  # reached with threshold 1, never passed
    assert (cache.computed, cache.skipped) == (skips.count(False), skips.count(True))
    assert one.step == 0 and one.residual is None


def test_the_last_step_may_be_skipped_and_the_next_picture_starts_afresh() -> None:
    """A 3-step pass with no retention and a generous threshold computes step 0 and skips steps 1 and 2 (ratios
    1.0, 1.0, 0.89 resampled from diffusers' table); the skipped last step still gets start + residual."""
    cache = MagCache(1.0, 3, max_skip_steps=3, retention_ratio=0.0)
    one = cache.pass_cache("uncond")
    start = torch.full((1, 1, 2), 2.0)
    assert not one.skip()
    one.keep(start, start + 1)
    for _ in range(2):
        assert one.skip()
        assert torch.equal(one.reuse(start), start + 1)
    assert (one.step, one.residual, cache.computed, cache.skipped) == (0, None, 1, 2)
    assert not one.skip()  # the next picture's first step has nothing to reuse


def test_a_cuda_graph_replay_and_a_step_cache_are_refused_together(tiny_pipeline: Any) -> None:
    model = tiny_pipeline.transformer
    noise = torch.zeros(1, 4, model.config.in_channels)
    context = torch.zeros(1, 2, model.config.context_in_dim)
    cache = MagCache(0.1, 2, max_skip_steps=3, retention_ratio=0.2)
    with pytest.raises(ValueError, match="give forward or step_cache, not both"):
        sampling.denoise(
            model,
            noise,
            sampling.image_ids(2, 2),
            context,
            sampling.text_ids(2),
            sampling.sigmas(2, 4),
            forward=model,
            step_cache=cache,
        )


def test_off_unless_asked_and_a_cached_run_says_what_it_skipped(tiny_pipeline: Any) -> None:
    request = GenerationRequest("a red cube", 64, 64, seed=3, steps=STEPS)
    plain = tiny_pipeline.generate(request)
    cached = tiny_pipeline.generate(
        GenerationRequest(**{**request.__dict__, "step_cache": from_recipe(CACHE)})
    )
    assert "cache" not in plain.recipe(0) and "steps_skipped" not in plain.cache_hits
    assert cached.recipe(0)["cache"] == CACHE
    assert 0 < cached.cache_hits["steps_skipped"] < STEPS  # distilled: one pass a step
    assert cached.images[0].tobytes() != plain.images[0].tobytes()


# -- through the CLI and a real server ---------------------------------------------------------------------------
@pytest.mark.slow
def test_the_cli_records_the_cache_and_its_rerun_command_makes_the_same_bytes(tmp_path: Path) -> None:
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    done = run_cli("--seed", "4", "--width", "64", "--height", "64", "--steps", str(STEPS), "--step-cache",
                   "magcache:0.5", "--out", str(first))  # fmt: skip
    assert done.returncode == 0, done.stderr
    recipe = provenance(first)
    assert recipe["cache"] == CACHE
    argv = rerun_command(recipe, [], str(again))
    assert argv is not None and argv[:2] == ["klein-agent", "generate"]
    rerun = subprocess.run(
        [sys.executable, "-m", "klein_agent", *argv[1:]], capture_output=True, text=True, timeout=180
    )
    assert rerun.returncode == 0, rerun.stderr
    assert again.read_bytes() == first.read_bytes()


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_served_call_takes_the_cache_records_it_and_its_rerun_makes_the_same_bytes(
    tmp_path: Path,
) -> None:
    server = StdioServerParameters(command=sys.executable, args=serve_args(tmp_path / "store"), cwd=REPO)
    args = {"prompt": "a red cube", "width": 64, "height": 64, "seed": 4, "steps": STEPS}
    async with Client(server) as client:
        bad = await client.call_tool("generate", {**args, "cache": {"kind": "magcache", "threshold": 2}})
        assert bad.is_error and "step cache: threshold must be above 0 and at most 1" in bad.content[0].text
        cached = await call(client, "generate", {**args, "cache": CACHE})
        assert cached.structured_content["cache_hits"]["steps_skipped"] > 0
        image_id = ids_of(cached)[0]
        meta = await read_meta(client, image_id)
        assert meta["recipe"]["cache"] == CACHE and meta["rerun"]["arguments"]["cache"] == CACHE
        rerun = ids_of(await call(client, "generate", meta["rerun"]["arguments"]))[0]
        assert await read_png(client, rerun) == await read_png(client, image_id)
        plain = ids_of(await call(client, "generate", args))[0]
        assert await read_png(client, plain) != await read_png(client, image_id)
        assert "cache" not in (await read_meta(client, plain))["recipe"]
