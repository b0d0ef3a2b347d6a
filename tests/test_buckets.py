"""Compile shape buckets: the menu and the mapping (rules.buckets), and on the tiny pipeline compiled with Dynamo's
"eager" backend (the guards and graphs are what is tested, not Inductor's kernels): a new size inside a warmed
bucket compiles nothing and gives the uncompiled pictures; past the menu a size compiles a static graph, logged, and
past the bound runs uncompiled, logged."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._dynamo.config
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from klein_agent.pipeline import load_pipeline
from klein_agent.pipeline.klein import KleinPipeline
from klein_agent.pipeline.warmup import compile_pipeline_, warm_up
from klein_agent.rules import buckets, limits, resolution
from klein_agent.rules.buckets import MENU, ShapeBucket, bucket_for, check_menu, image_tokens, select
from klein_agent.rules.requests import GenerationRequest
from klein_agent.speedups import compilation

# Small ranges so the tiny model reaches past the menu at a cheap size: 64x64 is 16 tokens, 128x128 is 64.
SMALL_MENU = (
    ShapeBucket("small", 16, 64, (128, 128)),
    ShapeBucket("medium", 65, 256, (256, 256)),
)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    with torch._dynamo.config.patch(cache_size_limit=8, accumulated_cache_size_limit=256):
        yield
    torch._dynamo.reset()


@pytest.fixture
def pipe() -> KleinPipeline:
    return load_pipeline("tiny", device="cpu")


# The decoder's graph is guarded on the convolution backend PyTorch picks for the input's size (on the CPU, at this
# tiny width, oneDNN from an input area of ~160 latent pixels on): the sizes below stay on one side of it. See
# docs/performance.md for the real shapes.


def pictures(pipe: KleinPipeline, width: int, height: int, refs: int = 0) -> list[bytes]:
    from PIL import Image

    references = tuple(Image.new("RGB", (64, 64), (40 * k, 90, 200)) for k in range(refs))
    result = pipe.generate(GenerationRequest("a bucket", width, height, seed=3, references=references))
    return [image.tobytes() for image in result.images]


# -- the rules ----------------------------------------------------------------------------------------------------


def test_menu_is_contiguous_and_holds_its_examples() -> None:
    check_menu(MENU)
    assert [b.example_tokens for b in MENU] == [1024, 4096, 8192, 16384, 20480]
    for lower, upper in itertools.pairwise(MENU):
        assert upper.min_tokens == lower.max_tokens + 1  # no gap a size could fall into
    assert MENU[0].min_tokens == image_tokens((64, 64)) == buckets.MIN_TOKENS


def test_the_dynamic_ranges_cover_what_the_rules_allow() -> None:
    # every output side a caller may give decodes inside the decoder's range (8 px per raw latent)
    sides = range(limits.MIN_SIDE, limits.MAX_SIDE + 1, limits.SIZE_MULTIPLE)
    low, high = buckets.DECODER_SIDE_RANGE
    assert (min(sides) // 8, max(sides) // 8) == (low, high)
    # the most reference tokens klein 9B-KV can keep: MAX_REFERENCES of the largest prepared reference
    sizes = [(1024, 1024), *itertools.product(range(64, 4097, 61), range(64, 4097, 97))]
    largest = max(
        image_tokens((0, 0), [resolution.prepared_reference_size(w, h)])
        for w, h in sizes
        if max(w / h, h / w) <= limits.REFERENCE_MAX_ASPECT
    )
    assert (2, limits.MAX_REFERENCES * largest) == buckets.REFERENCE_TOKEN_RANGE
    # speedups compiles over these very ranges
    assert compilation.DECODER_SIDE_RANGE == buckets.DECODER_SIDE_RANGE
    assert compilation.REFERENCE_TOKEN_RANGE == buckets.REFERENCE_TOKEN_RANGE
    assert compilation.PAST_MENU_SHAPES == buckets.PAST_MENU_SHAPES


def test_a_request_maps_to_the_range_of_its_image_tokens() -> None:
    assert image_tokens((1024, 768), [(512, 512)]) == 64 * 48 + 32 * 32
    assert bucket_for(image_tokens((512, 512))) is MENU[0]
    assert bucket_for(image_tokens((528, 512))) is MENU[1]  # one token column more
    assert bucket_for(image_tokens((1024, 1024), [(1024, 1024)])) is MENU[2]
    assert bucket_for(image_tokens((880, 1168), [(880, 1168)] * 2)) is MENU[3]
    assert bucket_for(image_tokens((2048, 2048))) is MENU[3]
    assert bucket_for(image_tokens((2048, 2048), [(1024, 1024)])) is MENU[4]
    assert bucket_for(image_tokens((2048, 2048), [(1024, 1024)] * 2)) is None  # past the menu


def test_bad_menus_and_names_are_refused() -> None:
    with pytest.raises(ValueError, match="must start above"):
        check_menu([ShapeBucket("a", 16, 64, (128, 128)), ShapeBucket("b", 60, 256, (256, 256))])
    with pytest.raises(ValueError, match="must start above"):
        check_menu([ShapeBucket("zero-one", 1, 64, (128, 128))])  # Dynamo specialises 0 and 1
    with pytest.raises(ValueError, match="outside its range"):
        check_menu([ShapeBucket("a", 16, 64, (512, 512))])
    assert select("2, up to 512x512,2") == (MENU[1], MENU[0])
    assert select(None) == select("all") == MENU and select("none") == ()
    with pytest.raises(ValueError, match="1: up to 512x512"):
        select("huge")


# -- compiled, on the tiny pipeline -------------------------------------------------------------------------------


@pytest.mark.slow  # ~40-80 s on 2 cores: seven tiny pictures through Dynamo; the quick subset keeps the load test
def test_a_new_size_inside_a_warmed_bucket_compiles_nothing(pipe: KleinPipeline) -> None:
    expected = {size: pictures(pipe, *size) for size in [(96, 128), (112, 128)]}
    counter = CompileCounter()
    compile_pipeline_(pipe, SMALL_MENU, backend=counter)
    reports: list[tuple[int, int, str]] = []
    seconds = warm_up(pipe, SMALL_MENU[:1], lambda *r: reports.append(r))
    # two block kinds and the decoder, once each, for the whole bucket
    assert counter.frame_count == 3 and len(seconds) == 1
    assert [r[:2] for r in reports] == [(0, 1), (1, 1)] and "small (64 tokens)" in reports[-1][2]
    for size, images in expected.items():  # 48 and 56 tokens: new sizes inside the warmed bucket
        assert pictures(pipe, *size) == images  # the uncompiled pipeline's pictures, byte for byte
    assert counter.frame_count == 3
    pictures(pipe, 96, 128, refs=1)  # 48 + 16 tokens: a reference counts toward the same bucket
    assert counter.frame_count == 3
    # the next bucket, not warmed, compiles once (blocks only: the decoder's graph covers every size) on its
    # first request and never again inside it
    pictures(pipe, 160, 128)
    assert counter.frame_count == 5
    pictures(pipe, 192, 176)
    assert counter.frame_count == 5


@pytest.mark.slow  # ~40-80 s on 2 cores
def test_past_the_menu_compiles_static_graphs_then_runs_uncompiled_logged(
    pipe: KleinPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    counter = CompileCounter()
    state = compile_pipeline_(pipe, SMALL_MENU, backend=counter, decoder=False)
    state.past_menu_shapes = 2
    warm_up(pipe, SMALL_MENU)
    assert counter.frame_count == 4
    caplog.set_level(logging.WARNING, logger="klein_agent.speedups.compilation")
    expected = pictures(pipe, 272, 272)  # 289 tokens, past 256: a static graph per block kind
    assert counter.frame_count == 6 and state.static_sizes == {289}
    assert (
        "289 image tokens is past the compile buckets (largest 256): compiling a static graph" in caplog.text
    )
    pictures(pipe, 272, 272)  # the same size again reuses it, and is not logged again
    assert counter.frame_count == 6 and caplog.text.count("289 image tokens") == 1
    pictures(pipe, 288, 272)
    assert counter.frame_count == 8 and state.static_sizes == {289, 306}
    caplog.clear()
    uncompiled = pictures(pipe, 304, 272)  # a third past-menu size with the bound at 2: eager, and said so
    assert counter.frame_count == 8 and state.eager_sizes == {323}
    assert "the transformer blocks run uncompiled (eager) at this size" in caplog.text
    torch._dynamo.reset()
    plain = load_pipeline("tiny", device="cpu")
    assert pictures(plain, 272, 272) == expected and pictures(plain, 304, 272) == uncompiled


@pytest.mark.slow
def test_load_pipeline_compiles_and_warms_before_returning(caplog: pytest.LogCaptureFixture) -> None:
    """`serve --model tiny --compile --warm-buckets 1` as the engine's factory runs it; only Inductor is swapped for
    Dynamo's eager backend."""
    caplog.set_level(logging.INFO, logger="klein_agent.pipeline.build")
    counters.clear()
    load_pipeline(
        "tiny", device="cpu", compile=True, compile_backend="eager"
    )  # generate --compile: no warm-up
    assert counters["stats"]["unique_graphs"] == 0 and "compile warm-up" not in caplog.text
    torch._dynamo.reset()
    pipe = load_pipeline("tiny", device="cpu", compile=True, compile_backend="eager", warm_buckets="1")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3
    assert "compile warm-up 0/1: compiling 1 shape buckets" in caplog.text
    assert "compile warm-up 1/1: bucket up to 512x512 (1024 tokens) in" in caplog.text
    pictures(pipe, 512, 496)  # 992 tokens: inside the warmed bucket
    pictures(pipe, 256, 256, refs=2)  # 256 + 2 x 16
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_inductor_cache_goes_to_a_klein_agent_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation.compile_cache_dir() == tmp_path / "klein-agent" / "torch-compile"
    # Inductor's own default, which it writes into the variable when first asked, is not a choice of the user's
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compilation.compile_cache_dir() == tmp_path / "klein-agent" / "torch-compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation.compile_cache_dir() == tmp_path / "home" / ".cache" / "klein-agent" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation.use_compile_cache() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    assert cache_dir() == str(tmp_path / "mine")
    assert torch._inductor.config.fx_graph_cache and torch._inductor.config.autotune_local_cache


@pytest.mark.slow  # writes a tiny klein 9B-KV checkpoint with diffusers
def test_kv_references_are_dynamic_in_their_own_dimension(tmp_path: Path) -> None:
    """klein 9B-KV: the kept reference keys and values are dynamic over the reference token count, so retries on
    other references (other counts, other sizes) in the same output bucket compile nothing."""
    from PIL import Image
    from reference_checkpoints import Shape, write_reference_checkpoint

    folder = write_reference_checkpoint(tmp_path / "kv", Shape(kv=True), seed=4)
    pipe = load_pipeline(str(folder), device="cpu")
    assert pipe.kv_references
    plain = load_pipeline(str(folder), device="cpu")
    counter = CompileCounter()
    compile_pipeline_(pipe, SMALL_MENU, backend=counter, decoder=False)

    def refs(*sizes: tuple[int, int]) -> tuple[Image.Image, ...]:
        return tuple(Image.new("RGB", size, (30 * k, 120, 60)) for k, size in enumerate(sizes, 1))

    def run(p: KleinPipeline, references: tuple[Image.Image, ...], seed: int) -> bytes:
        request = GenerationRequest("kv", 96, 96, seed=seed, references=references)
        return p.generate(request).images[0].tobytes()

    assert run(pipe, refs((64, 64)), 1) == run(plain, refs((64, 64)), 1)
    compiled = counter.frame_count  # the blocks with kept keys and values: one graph per block kind
    assert compiled == 2
    for seed, references in enumerate([refs((128, 64)), refs((64, 64), (96, 80)), refs((160, 96))], start=2):
        assert run(pipe, references, seed) == run(plain, references, seed)
    assert counter.frame_count == compiled


def test_serve_refuses_an_unknown_bucket_before_loading() -> None:
    import argparse

    from klein_agent.model_options import add_model_arguments, generator_factory

    parser = argparse.ArgumentParser()
    add_model_arguments(parser, serve=True)
    args = parser.parse_args(["--model", "tiny", "--compile", "--warm-buckets", "2,huge"])
    with pytest.raises(ValueError, match="unknown compile bucket 'huge'"):
        generator_factory(args)
    assert parser.parse_args(["--model", "tiny"]).warm_buckets == "all"
    generate = argparse.ArgumentParser()
    add_model_arguments(generate)
    assert not hasattr(generate.parse_args(["--model", "tiny"]), "warm_buckets")  # generate warms nothing
