"""The resident pipeline's own behaviour: caches, progress, validation, cancellation between steps."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from klein_agent.pipeline import KleinPipeline, load_pipeline
from klein_agent.pipeline.imaging import prepare_reference
from klein_agent.rules import limits, resolution
from klein_agent.rules.requests import GenerationRequest, NonFiniteOutputError
from klein_agent.service.pngfile import encode_png


@pytest.fixture(scope="module")
def pipe() -> KleinPipeline:
    return load_pipeline("tiny", device="cpu")


def picture(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8)
    return Image.frombytes("RGB", size, pixels.numpy().tobytes())


@pytest.mark.slow
def test_retry_skips_the_text_encoder_and_the_reference_encoding(
    pipe: KleinPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"text": 0, "encode": 0}
    text_forward, encode = pipe.text_embedder.forward, pipe.autoencoder.encode

    def counting_text(prompts: list[str]) -> torch.Tensor:
        calls["text"] += 1
        return text_forward(prompts)

    def counting_encode(x: torch.Tensor) -> torch.Tensor:
        calls["encode"] += 1
        return encode(x)

    monkeypatch.setattr(pipe.text_embedder, "forward", counting_text)
    monkeypatch.setattr(pipe.autoencoder, "encode", counting_encode)
    request = GenerationRequest("a retry prompt nobody used before", 64, 64, seed=1, references=(picture(1),))
    first = pipe.generate(request)
    assert calls == {"text": 1, "encode": 1} and first.cache_hits == {"prompt": 0, "references": 0}
    second = pipe.generate(GenerationRequest(request.prompt, 64, 64, seed=2, references=(picture(1),)))
    assert calls == {"text": 1, "encode": 1} and second.cache_hits == {"prompt": 1, "references": 1}
    # a different reference is encoded, the same prompt is not
    pipe.generate(GenerationRequest(request.prompt, 64, 64, seed=2, references=(picture(2),)))
    assert calls == {"text": 1, "encode": 2}
    # the cached path gives the very picture the uncached one gave
    again = pipe.generate(GenerationRequest(request.prompt, 64, 64, seed=1, references=(picture(1),)))
    assert again.images[0].tobytes() == first.images[0].tobytes()


def test_progress_rises_one_unit_at_a_time(pipe: KleinPipeline) -> None:
    seen: list[tuple[int, int, str]] = []
    pipe.generate(
        GenerationRequest("progress", 48, 48, seed=0, steps=3),
        progress=lambda d, t, m: seen.append((d, t, m)),
    )
    assert [d for d, _, _ in seen] == [1, 2, 3, 4, 5]
    assert {t for _, t, _ in seen} == {5}
    assert seen[1][2] == "step 1/3" and seen[-1][2] == "decoded"


def test_a_raising_callback_stops_between_steps(pipe: KleinPipeline) -> None:
    seen: list[int] = []

    class Stop(Exception):
        pass

    def stop_after_two(done: int, total: int, message: str) -> None:
        seen.append(done)
        if done == 3:  # conditioning + 2 steps
            raise Stop

    with pytest.raises(Stop):
        pipe.generate(GenerationRequest("cancel me", 48, 48, seed=0), progress=stop_after_two)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerationRequest("x", 50, 48, seed=0), "width must be a positive multiple of 16"),
        (GenerationRequest("x", 48, 0, seed=0), "height must be a positive multiple of 16"),
        (GenerationRequest("x", 48, 48, seed=0, num_images=0), "num_images"),
        (GenerationRequest("x", 48, 48, seed=0, steps=0), "steps"),
        (GenerationRequest("x", 48, 48, seed=2**32 - 1, num_images=2), "use a seed of at most 4294967294"),
        (GenerationRequest("x", 48, 48, seed=-3), "seed must be an integer from 0 to 4294967295"),
        (GenerationRequest("x", 48, 48, seed=0, references=tuple(picture(i) for i in range(5))), "at most 4"),
        (GenerationRequest("x", 48, 48, seed=0, references=(picture(0, (40, 64)),)), "at least 64"),
        (GenerationRequest("x", 48, 48, seed=0, references=(picture(0, (1040, 64)),)), "aspect ratio"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    pipe: KleinPipeline, request_: GenerationRequest, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pipe.generate(request_)


@pytest.mark.parametrize(
    ("width", "height", "references", "want"),
    [
        (None, None, [], (1024, 1024)),  # 64 tokens a side, the reference's default
        (512, None, [], (512, 512)),  # one side: the other keeps the default's (square) aspect
        (None, None, [(100, 70)], (96, 64)),  # the first reference as prepared: floored to 16
        (None, None, [(2048, 1024)], (1440, 720)),  # scaled to ~1 Mpx (int(1448.15), int(724.08)), floored
        (None, None, [(3024, 4032)], (880, 1168)),  # a phone photo: ~1 Mpx, not its own 12 Mpx
        (None, 640, [(3024, 4032)], (480, 640)),  # one side: the prepared reference's 3:4 kept
        (256, None, [(100, 70), (500, 64)], (256, 176)),  # image 1 decides, image 2 does not
        (320, 192, [(100, 70)], (320, 192)),  # both given: as given
    ],
)
def test_the_output_size_rule(
    pipe: KleinPipeline,
    width: int | None,
    height: int | None,
    references: list[tuple[int, int]],
    want: tuple[int, int],
) -> None:
    request = GenerationRequest(
        "x", width, height, seed=0, references=tuple(picture(i, size) for i, size in enumerate(references))
    )
    resolved = pipe.resolve(request)
    assert (resolved.width, resolved.height) == want
    first = references[0] if references else None
    prepared = None if first is None else resolution.prepared_reference_size(*first)
    assert resolution.output_size(width, height, prepared) == want  # the rule the CLI and the server check
    if references:
        assert resolved.reference_sizes[0] == prepare_reference(request.references[0]).size


def test_what_ran_is_reported_and_builds_the_recipe(pipe: KleinPipeline) -> None:
    result = pipe.generate(GenerationRequest("report", 64, 48, num_images=2, guidance=3.0))
    r = result.resolved
    assert len(r.seeds) == 2 and r.seeds[1] == r.seeds[0] + 1 and r.seeds[0] < 2**31  # drawn
    assert (
        r.steps == limits.DISTILLED_STEPS and r.guidance is None and not r.cfg
    )  # distilled: no guidance, whatever was asked
    assert result.recipe(1) == {
        "prompt": "report",
        "seed": r.seeds[1],
        "width": 64,
        "height": 48,
        "steps": 4,
        "guidance": None,
        "model": "tiny",
        "variant": "tiny",
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prompt", "size", "references"),
    [
        ("a lighthouse", (64, 48), 0),
        ("two prompts, one reference", (128, 64), 1),
        ("three refs at another size", (80, 96), 3),
    ],
)
def test_picture_k_of_a_batch_is_byte_for_byte_the_run_with_seed_plus_k(
    pipe: KleinPipeline, prompt: str, size: tuple[int, int], references: int
) -> None:
    refs = tuple(picture(20 + i, (96 + 16 * i, 80)) for i in range(references))
    batch = pipe.generate(GenerationRequest(prompt, *size, seed=100, num_images=3, references=refs))
    for k in range(3):
        single = pipe.generate(GenerationRequest(prompt, *size, seed=100 + k, references=refs))
        assert single.images[0].tobytes() == batch.images[k].tobytes()
        assert single.recipe(0) == batch.recipe(k)
        want = encode_png(single.images[0], provenance=single.recipe(0))
        assert encode_png(batch.images[k], provenance=batch.recipe(k)) == want


def test_non_finite_output_is_an_error_that_names_the_fix() -> None:
    pipe = load_pipeline("tiny", dtype="float16")
    with torch.no_grad():
        pipe.transformer.img_in.weight.mul_(1e6)  # activations past float16's 65504
    with pytest.raises(
        NonFiniteOutputError, match=r"non-finite values .* float16: run with --dtype bfloat16"
    ):
        pipe.generate(GenerationRequest("overflow", 64, 64, seed=0))
    damaged = load_pipeline("tiny")
    with torch.no_grad():
        damaged.autoencoder.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match=r"decoded pixels.*damaged.*download it again"):
        damaged.generate(GenerationRequest("nan", 64, 64, seed=0))


@pytest.mark.slow
def test_text_encoder_offload_moves_it_only_for_uncached_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    from klein_agent.pipeline.offload import HostResident

    pipe = load_pipeline("tiny", device="cpu")
    want = pipe.generate(GenerationRequest("offloaded", 48, 48, seed=3)).images[0].tobytes()
    # CPU-only machines cannot move anything anywhere; give the pipeline the host residency a GPU one would hold.
    pipe._host_text = HostResident(pipe.text_embedder)
    pipe.clear_caches()
    visits: list[str] = []
    original_run = pipe._host_text.run

    def spy_run(device, *args):  # type: ignore[no-untyped-def]
        visits.append(str(device))
        return original_run(device, *args)

    monkeypatch.setattr(pipe._host_text, "run", spy_run)
    got = pipe.generate(GenerationRequest("offloaded", 48, 48, seed=3)).images[0].tobytes()
    assert visits == [str(pipe.device)]  # one visit for the new prompt, nothing moved back
    pipe.generate(GenerationRequest("offloaded", 48, 48, seed=4))
    assert len(visits) == 1  # cached prompt: the encoder is not visited
    assert got == want


def test_fp8_option_quantizes_the_blocks_and_stays_close() -> None:
    from klein_agent.speedups.fp8 import Float8Linear

    request = GenerationRequest("fp8", 48, 48, seed=5)
    plain = load_pipeline("tiny").generate(request).images[0]
    pipe = load_pipeline("tiny", fp8=True)
    linears = [m for m in pipe.transformer.modules() if isinstance(m, Float8Linear)]
    assert len(linears) == 4 * 2 * 2 + 2 * 2  # 4 per stream per double block, 2 per single block
    quantized = pipe.generate(request).images[0]
    diff = torch.tensor(list(plain.tobytes())).float() - torch.tensor(list(quantized.tobytes())).float()
    assert 0 < diff.abs().mean() < 8  # changed, by a few levels at most


def test_attention_uses_a_fused_kernel_not_the_quadratic_fallback(pipe: KleinPipeline) -> None:
    """A strided last dimension sends SDPA to its math path, which materialises the whole attention matrix
    (2x slower decodes at 1024 px on CPU, and a memory blow-up); both the autoencoder and the transformer avoid it."""
    with torch.inference_mode(), torch.profiler.profile() as prof:
        pipe.generate(GenerationRequest("kernels", 64, 64, seed=0, steps=1))
    names = {event.key for event in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in names
    assert "aten::_scaled_dot_product_attention_math" not in names


@pytest.mark.parametrize(("name", "params"), [("klein-4b", 3_875_544_576), ("klein-9b", 9_078_581_248)])
def test_random_weights_of_the_real_shapes_build(name: str, params: int) -> None:
    """bench.py builds these on the GPU; on the meta device the same code runs here in no memory."""
    from klein_agent.loading.random_init import build_random_models
    from klein_agent.model.configs import preset

    transformer, autoencoder, text = build_random_models(preset(name), device="meta")
    # the counts of diffusers' Flux2Transformer2DModel built with the same transformer config
    assert sum(p.numel() for p in transformer.parameters()) == params
    assert text.output_layers == (9, 18, 27) and len(text.model.layers) == 27
    assert autoencoder.config.latent_channels == transformer.config.in_channels == 128


def test_reference_encoding_runs_channels_last_through_the_encoder(pipe: KleinPipeline) -> None:
    """The encoder input's layout is chosen on purpose (imaging.ENCODER_LAYOUT): every encoder convolution must see
    channels-last activations, as diffusers' preprocessed tensor gives them; an NCHW input would send oneDNN/cuDNN
    to their slower NCHW kernels from conv_in on."""
    from klein_agent.pipeline.imaging import ENCODER_LAYOUT, to_tensor

    assert ENCODER_LAYOUT is torch.channels_last
    x = to_tensor(picture(3))
    assert x.shape == (1, 3, 64, 80) and x.stride() == (64 * 80 * 3, 1, 80 * 3, 3)
    seen: list[tuple[str, bool]] = []
    convs = [  # the attention's 1x1 convolutions are applied as linear layers over tokens (not called)
        (n, m)
        for n, m in pipe.autoencoder.encoder.named_modules()
        if isinstance(m, torch.nn.Conv2d) and ".attn_" not in n
    ]
    hooks = [
        m.register_forward_hook(
            lambda _m, i, _o, n=n: seen.append((n, i[0].is_contiguous(memory_format=torch.channels_last)))
        )
        for n, m in convs
    ]
    try:
        pipe.clear_caches()
        with torch.inference_mode():
            pipe.encode_references([picture(3)])
    finally:
        for hook in hooks:
            hook.remove()
        pipe.clear_caches()
    assert [n for n, _ in seen] == [n for n, _ in convs]  # every convolution ran once
    assert [n for n, channels_last in seen if not channels_last] == []


def test_encoder_input_layout_is_the_references(pipe: KleinPipeline) -> None:
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    from klein_agent.pipeline.imaging import to_tensor

    prepared = prepare_reference(picture(4), 16)
    theirs = VaeImageProcessor(vae_scale_factor=16).preprocess(
        prepared, height=prepared.height, width=prepared.width, resize_mode="crop"
    )
    ours = to_tensor(prepared)
    assert torch.equal(ours, theirs) and ours.stride() == theirs.stride()


def test_float16_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="klein_agent.pipeline.build"):
        load_pipeline("tiny", device="cpu", dtype="float32")
        assert not [r for r in caplog.records if "float16" in r.getMessage()]
        load_pipeline("tiny", device="cpu", dtype="float16")
    assert any("FLUX overflows in float16" in r.getMessage() for r in caplog.records)


def test_stage_timings_never_synchronize_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Production calls must not stall the GPU queue for a timing report (issue 13): the timing helper is asked
    about a CUDA device and must not call torch.cuda.synchronize."""
    from klein_agent.pipeline import klein

    syncs: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    assert klein._ms_since(0.0, torch.device("cuda")) > 0
    assert syncs == []
