"""klein 9B-KV's cross-call cache of reference keys and values: byte-identical pictures, steps that skip the
reference tokens (step 0 included) on a retry, keys, the byte bound and the option."""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from reference_checkpoints import Shape, write_reference_checkpoint
from test_pipeline_parity import picture

from klein_agent.model_options import add_model_arguments, generator_factory
from klein_agent.pipeline import KleinPipeline, load_pipeline
from klein_agent.pipeline.caches import ByteLRUCache
from klein_agent.rules.requests import GenerationRequest

REFS = (picture(150, 100, 1), picture(72, 136, 4))
FIRST = GenerationRequest("image 1 in the style of image 2", seed=5, references=REFS)
RETRY = replace(FIRST, prompt="image 2 in the style of image 1, at night", seed=9)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reference_checkpoint(tmp_path_factory.mktemp("kv-cache") / "ckpt", Shape(kv=True), seed=4)


class Watch:
    """Counts reference passes and records the image-token count each transformer forward sees."""

    def __init__(self, pipe: KleinPipeline) -> None:
        self.reference_passes = 0
        self.forward_tokens: list[int] = []
        transformer = pipe.transformer
        original = transformer.reference_kv

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.reference_passes += 1
            return original(*args, **kwargs)

        transformer.reference_kv = counted  # type: ignore[method-assign]
        transformer.register_forward_pre_hook(lambda _m, args: self.forward_tokens.append(args[0].shape[1]))

    def reset(self) -> None:
        self.reference_passes = 0
        self.forward_tokens.clear()


def png(images: list[Image.Image]) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@pytest.mark.slow
def test_a_retry_skips_the_references_at_every_step_and_is_byte_identical(folder: Path) -> None:
    pipe = load_pipeline(str(folder))
    watch = Watch(pipe)
    first = pipe.generate(FIRST)
    noisy = (first.resolved.width // 16) * (first.resolved.height // 16)
    assert watch.reference_passes == 1 and first.cache_hits["reference_kv"] == 0
    assert watch.forward_tokens == [noisy] * 4  # the references never ride with the noisy tokens
    held, capacity = pipe.reference_kv_cache_bytes
    assert 0 < held <= capacity

    watch.reset()
    cached = pipe.generate(RETRY)  # new prompt, new seed, same references
    assert watch.reference_passes == 0 and cached.cache_hits["reference_kv"] == 1
    assert cached.cache_hits["references"] == 0  # not even the autoencoder ran
    assert watch.forward_tokens == [noisy] * 4

    pipe.clear_caches()  # cleared with the model's caches: the same call now runs uncached
    assert pipe.reference_kv_cache_bytes[0] == 0
    watch.reset()
    uncached = pipe.generate(RETRY)
    assert watch.reference_passes == 1 and uncached.cache_hits["reference_kv"] == 0
    assert png(cached.images) == png(uncached.images)

    never = load_pipeline(str(folder), reference_kv_cache_bytes=0)  # nothing kept across calls
    assert png(never.generate(RETRY).images) == png(uncached.images)
    assert never.reference_kv_cache_bytes == (0, 0)


@pytest.mark.slow
def test_the_key_is_content_position_and_prepared_size(folder: Path) -> None:
    pipe = load_pipeline(str(folder))
    pipe.generate(FIRST)
    swapped = pipe.generate(replace(RETRY, references=REFS[::-1]))
    assert swapped.cache_hits["reference_kv"] == 0  # same pictures, other places
    other_size = (REFS[0].resize((120, 80)), REFS[1])
    assert pipe.generate(replace(RETRY, references=other_size)).cache_hits["reference_kv"] == 0
    changed = (REFS[0], picture(72, 136, 5))
    assert pipe.generate(replace(RETRY, references=changed)).cache_hits["reference_kv"] == 0
    assert pipe.generate(RETRY).cache_hits["reference_kv"] == 1
    assert pipe.generate(replace(RETRY, references=REFS[:1])).cache_hits["reference_kv"] == 0


@pytest.mark.slow
def test_the_cache_drops_the_least_recently_used_to_stay_in_bytes(folder: Path) -> None:
    probe = load_pipeline(str(folder))
    probe.generate(FIRST)
    one = probe.reference_kv_cache_bytes[0]
    pipe = load_pipeline(str(folder), reference_kv_cache_bytes=2 * one + one // 2)  # room for two such lists
    a, b, c = (replace(RETRY, references=(picture(150, 100, s), REFS[1])) for s in (11, 12, 13))
    for request in (a, b, a, c):  # a used again, so b is the oldest when c arrives
        pipe.generate(request)
    assert pipe.reference_kv_cache_bytes[0] == 2 * one
    assert pipe.generate(a).cache_hits["reference_kv"] == 1
    assert pipe.generate(c).cache_hits["reference_kv"] == 1
    assert pipe.generate(b).cache_hits["reference_kv"] == 0


def test_byte_lru_cache() -> None:
    cache: ByteLRUCache[str, bytes] = ByteLRUCache(10, len)
    assert cache.put("a", b"1234") and cache.put("b", b"1234")
    assert cache.get("a") == b"1234"
    assert cache.put("c", b"1234")  # drops b, the least recently used
    assert cache.get("b") is None and len(cache) == 2 and cache.nbytes == 8
    assert not cache.put("big", b"x" * 11) and len(cache) == 2  # too big alone: nothing dropped
    assert cache.put("a", b"123456") and cache.nbytes == 10
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="negative"):
        ByteLRUCache(-1, len)


def test_the_option_reaches_the_pipeline_and_has_a_device_default(folder: Path) -> None:
    from klein_agent.speedups.devices import default_reference_kv_cache_bytes

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--model", str(folder), "--reference-kv-cache-gib", "0.5"])
    pipe = generator_factory(args)()
    assert isinstance(pipe, KleinPipeline) and pipe.kv_references
    assert pipe.reference_kv_cache_bytes == (0, 512 * 1024**2)
    default = generator_factory(parser.parse_args(["--model", str(folder)]))()
    assert isinstance(default, KleinPipeline)
    assert default.reference_kv_cache_bytes[1] == default_reference_kv_cache_bytes(torch.device("cpu"))
    assert default_reference_kv_cache_bytes(torch.device("cpu")) == 2 * 1024**3
    for bad in ("-1", "lots", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "tiny", "--reference-kv-cache-gib", bad])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_retry_through_the_mcp_server_hits_the_cache_and_makes_the_uncached_picture(
    folder: Path, tmp_path: Path, anyio_backend: str
) -> None:
    """`serve --model <KV checkpoint>` wiring: the option reaches the pipeline the engine loads, and an agent's retry
    on the same reference files (new prompt, new seed) is served from the kept keys with the uncached pixels."""
    from mcp import Client

    from klein_agent.server.app import build_server
    from tests.conftest import make_server_state
    from tests.test_server_tools import call, read_png

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for k, ref in enumerate(REFS):
        ref.save(inputs / f"ref{k}.png")
    refs = [str(inputs / "ref0.png"), str(inputs / "ref1.png")]
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)

    async def compose(gib: str, *calls: tuple[str, int]) -> list[tuple[dict[str, int], bytes]]:
        factory = generator_factory(
            parser.parse_args(["--model", str(folder), "--reference-kv-cache-gib", gib])
        )
        state = make_server_state(factory, tmp_path / f"store-{gib}", inputs)
        try:
            async with Client(build_server(state)) as client:
                out = []
                for prompt, seed in calls:
                    made = await call(client, "compose", {"images": refs, "prompt": prompt, "seed": seed})
                    image_id = made.structured_content["images"][0]["image_id"]
                    out.append((made.structured_content["cache_hits"], await read_png(client, image_id)))
                return out
        finally:
            await state.engine.aclose()
            state.store.close()

    retry = ("image 2 in image 1, at night", 10)
    (first_hits, _), (retry_hits, retried) = await compose("1", ("image 1 in image 2", 9), retry)
    assert first_hits.get("reference_kv", 0) == 0 and retry_hits.get("reference_kv") == 1
    [(never_hits, uncached)] = await compose(
        "0", retry
    )  # nothing kept: the retry's request made from scratch
    assert never_hits.get("reference_kv", 0) == 0
    pixels = [Image.open(io.BytesIO(png)).convert("RGB").tobytes() for png in (retried, uncached)]
    assert pixels[0] == pixels[1]
