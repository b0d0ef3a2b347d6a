"""Each component against diffusers' on the same random weights, fp32 on CPU.

Tolerances come from the arithmetic (tests/tolerances.py): diffusers' module is also run in float64, and ours
must be within a small multiple of diffusers' own float32 rounding error, measured on this CPU. Each test also
checks that ours with one weight scaled by 1 + 1e-3 fails that bound."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline, compute_empirical_mu
from reference_checkpoints import KLEIN_SCHEDULER
from reference_pipeline import diffusers_autoencoder, diffusers_transformer
from tolerances import rounding_bound, scaled_weight
from transformers import Qwen3Config, Qwen3ForCausalLM

from klein_agent.loading import keymaps
from klein_agent.loading.random_init import build_tiny, init_random_
from klein_agent.model import sampling
from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import AutoencoderConfig, SchedulerConfig, TransformerConfig, preset
from klein_agent.model.text_encoder import TextEmbedder, TextEncoderTooShallowError, skipped_checkpoint_key
from klein_agent.model.transformer import Flux2Transformer

pytestmark = pytest.mark.slow  # every component against diffusers' own modules


@pytest.mark.parametrize(
    "config", [preset("tiny").transformer, preset("mid").transformer], ids=["tiny", "mid"]
)
def test_transformer_forward_matches_diffusers(config: TransformerConfig) -> None:
    torch.manual_seed(0)
    ref = diffusers_transformer(config)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = Flux2Transformer(config).eval()
    ours.load_state_dict(keymaps.transformer_from_diffusers(ref.state_dict()), strict=True)

    h, w, refs_h, refs_w, txt = 3, 5, 2, 4, 9  # non-square output plus one reference grid
    tokens = h * w + refs_h * refs_w
    x = torch.randn(2, tokens, config.in_channels)
    ctx = torch.randn(2, txt, config.context_in_dim)
    img_ids = torch.cat([sampling.image_ids(h, w), sampling.reference_ids([(refs_h, refs_w)])])
    txt_ids = sampling.text_ids(txt)
    t = torch.tensor([0.9, 0.25])

    def reference(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return model(
            hidden_states=x.to(dtype),
            encoder_hidden_states=ctx.to(dtype),
            timestep=t.to(dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
        )[0]

    with torch.no_grad():
        got = ours(x, img_ids, ctx, txt_ids, t)
        want = reference(ref, torch.float32)
        bound = rounding_bound("transformer", reference(copy.deepcopy(ref).double(), torch.float64), want)
        with scaled_weight(ours, "double_blocks.0.img_mlp.2.weight"):
            broken = ours(x, img_ids, ctx, txt_ids, t)
    assert got.shape == want.shape == (2, tokens, config.in_channels)
    bound.check(got)
    bound.check_catches(broken, "the first block's image MLP output weight x (1 + 1e-3)")


@pytest.mark.parametrize(
    "config",
    [
        preset("tiny").autoencoder,
        AutoencoderConfig(block_out_channels=(8, 16, 32), num_res_blocks=2, z_channels=6, norm_groups=4),
        AutoencoderConfig(
            block_out_channels=(8, 16),
            decoder_block_out_channels=(8, 8),
            num_res_blocks=1,
            z_channels=2,
            norm_groups=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_attention=False,
        ),
    ],
    ids=["tiny", "three-levels", "no-quant-no-attention-small-decoder"],
)
def test_autoencoder_encode_decode_match_diffusers(config: AutoencoderConfig) -> None:
    torch.manual_seed(1)
    ref = diffusers_autoencoder(config)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ref.bn.running_mean.normal_()
    ref.bn.running_var.uniform_(0.5, 2.0)
    ours = AutoEncoder(config).eval()
    ours.load_state_dict(keymaps.autoencoder_from_diffusers(ref.state_dict()), strict=True)

    token = config.pixels_per_token
    image = torch.rand(1, 3, 2 * token, 3 * token) * 2 - 1
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + config.bn_eps)
    ref64 = copy.deepcopy(ref).double()

    def encode(model: Any, image: torch.Tensor) -> torch.Tensor:
        latents = Flux2KleinPipeline._patchify_latents(model.encode(image).latent_dist.mode())
        return (latents - mean.to(image.dtype)) / std.to(image.dtype)

    def decode(model: Any, latents: torch.Tensor) -> torch.Tensor:
        return model.decode(
            Flux2KleinPipeline._unpatchify_latents(latents * std.to(latents.dtype) + mean.to(latents.dtype))
        ).sample

    with torch.no_grad():
        got = ours.encode(image)
        encoded = rounding_bound("encode", encode(ref64, image.double()), encode(ref, image))
        encoded.check(got)
        with scaled_weight(ours, "encoder.conv_out.weight"):
            encoded.check_catches(ours.encode(image), "the encoder's conv_out weight x (1 + 1e-3)")
        decoded = ours.decode(got)
        bound = rounding_bound("decode", decode(ref64, got.double()), decode(ref, got))
        with scaled_weight(ours, "decoder.conv_out.weight"):
            broken = ours.decode(got)
    assert decoded.shape == image.shape
    bound.check(decoded)
    bound.check_catches(broken, "the decoder's conv_out weight x (1 + 1e-3)")


@pytest.mark.parametrize("depth", [28, 36, 27])
def test_text_embedding_matches_diffusers(depth: int) -> None:
    """The reference reads hidden_states[9], [18], [27] of the full encoder: raw layer outputs, except that
    transformers hands back the final-normed state as the last entry, so a 27-layer encoder's layer 27 is normed."""
    _, _, tiny = build_tiny()
    config = Qwen3Config.from_dict(
        {**tiny.full_config.to_dict(), "num_hidden_layers": depth, "layer_types": None}
    )
    full = Qwen3ForCausalLM(config).eval()
    init_random_(full, torch.Generator().manual_seed(3))
    embedder = TextEmbedder(config, tiny.tokenizer).eval()
    kept = {
        k: v
        for k, v in full.model.state_dict().items()
        if not skipped_checkpoint_key("model." + k, 27, embedder.final_norm_on_last)
    }
    assert not embedder.model.load_state_dict(kept, strict=False).unexpected_keys
    embedder.reset_rotary(torch.device("cpu"))
    prompts = ["a red cube on a table", "", "ünïcödé and <|im_start|> tokens"]
    with torch.no_grad():
        got = embedder(prompts)
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(full, embedder.tokenizer, prompts)
        want64 = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            full.double(), embedder.tokenizer, prompts, dtype=torch.float64
        )
        with scaled_weight(embedder, "model.layers.0.mlp.down_proj.weight"):
            broken = embedder(prompts)
    assert got.shape == (3, 512, 3 * embedder.hidden_size)
    # the three layers' outputs differ in magnitude: each is checked against its own rounding
    for layer, part, part32, part64, part_broken in zip(
        embedder.output_layers,
        got.chunk(3, dim=-1),
        want.chunk(3, dim=-1),
        want64.chunk(3, dim=-1),
        broken.chunk(3, dim=-1),
        strict=True,
    ):
        bound = rounding_bound(f"text layer {layer}", part64, part32)
        bound.check(part)
        bound.check_catches(part_broken, "layer 0's MLP down_proj weight x (1 + 1e-3)")


def test_text_encoder_runs_only_the_layers_it_needs() -> None:
    _, _, embedder = build_tiny()
    assert embedder.output_layers == (9, 18, 27)
    assert len(embedder.model.layers) == 27  # of the checkpoint's 28
    assert not embedder.final_norm_on_last
    shallow = Qwen3Config.from_dict(
        {**embedder.full_config.to_dict(), "num_hidden_layers": 26, "layer_types": None}
    )
    with pytest.raises(TextEncoderTooShallowError, match=r"has 26 layers.*at least 27"):
        TextEmbedder(shallow, embedder.tokenizer)


def test_chat_template_matches_qwen3_thinking_off() -> None:
    _, _, embedder = build_tiny()
    text = embedder.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids, mask = embedder.tokenize(["hi"])
    assert ids.shape == (1, 512) and int(mask.sum()) < 512 and ids[0, -1] == embedder.tokenizer.pad_token_id


@pytest.mark.parametrize(
    "scheduler",
    [{}, {"time_shift_type": "linear"}, {"use_dynamic_shifting": False}, {"shift_terminal": 0.05}],
    ids=["klein", "linear", "static", "terminal"],
)
@pytest.mark.parametrize(
    ("tokens", "steps"),
    [(16, 4), (1024, 4), (4096, 4), (4080, 4), (16384, 4), (4096, 50), (300, 28), (15, 1), (30, 2)],
)
def test_schedule_is_the_reference_schedulers_bit_for_bit(
    tokens: int, steps: int, scheduler: dict[str, object]
) -> None:
    assert sampling.empirical_mu(tokens, steps) == pytest.approx(
        compute_empirical_mu(tokens, steps), abs=1e-9
    )
    reference = FlowMatchEulerDiscreteScheduler(**{**KLEIN_SCHEDULER, **scheduler})
    if steps == 1 and scheduler.get("shift_terminal"):
        # a 0/0 in the reference (a warning, then NaN pictures); a clear error here
        with pytest.warns(RuntimeWarning):
            reference.set_timesteps(sigmas=np.linspace(1.0, 1.0, 1), mu=compute_empirical_mu(tokens, steps))
        with pytest.raises(ValueError, match="at least 2 steps"):
            sampling.sigmas(steps, tokens, SchedulerConfig(shift_terminal=0.05))
        return
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    config = SchedulerConfig(
        **{
            **{k: v for k, v in KLEIN_SCHEDULER.items() if k in SchedulerConfig.__dataclass_fields__},
            **scheduler,
        }
    )  # type: ignore[arg-type]
    ours = sampling.sigmas(steps, tokens, config)
    assert torch.equal(ours, reference.sigmas)
    assert torch.equal(ours[:-1] * config.num_train_timesteps, reference.timesteps)


def test_schedule_published_values() -> None:
    # 1024x1024 (4096 tokens) at 4 steps, as BFL `flux2/sampling.py` `compute_empirical_mu` and `get_schedule`
    # compute them
    assert sampling.empirical_mu(4096, 4) == pytest.approx(2.2912, abs=1e-4)
    assert sampling.schedule(4, 4096) == pytest.approx([1.0, 0.9674, 0.9081, 0.7672, 0.0], abs=1e-4)
    assert sampling.empirical_mu(16384, 4) == pytest.approx(3.2300, abs=1e-4)
    with pytest.raises(ValueError, match="steps"):
        sampling.schedule(0, 16)


def test_position_ids_follow_the_reference_layout() -> None:
    ids = sampling.reference_ids([(2, 3), (1, 2)])
    assert ids[:6, 0].tolist() == [10] * 6 and ids[6:, 0].tolist() == [20, 20]
    assert ids[:6, 1:3].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    want = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 1, 2)])[0]
    assert torch.equal(ids, want)
    assert torch.equal(sampling.text_ids(5), Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 5, 1))[0])
    assert torch.equal(
        sampling.image_ids(3, 4), Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, 3, 4))[0]
    )


def test_rope_frequencies() -> None:
    cos, _sin = Flux2Transformer(preset("tiny").transformer).rope(
        sampling.text_ids(2), sampling.image_ids(1, 2)
    )
    assert cos.shape == (4, 16) and cos.dtype == torch.float32
    # token (0, 0, 1, 0): only the w axis (frequency slots 8..11) rotates, by 1 * theta^(-2k/8)
    expected = [math.cos(2000 ** (-2 * k / 8)) for k in range(4)]
    assert cos[3, 8:12].tolist() == pytest.approx(expected, abs=1e-6)
    assert cos[3, :8].tolist() == pytest.approx([1.0] * 8)
