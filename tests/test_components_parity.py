"""Each component against diffusers' on the same random weights, fp32 on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline, compute_empirical_mu
from reference_pipeline import diffusers_autoencoder, diffusers_scheduler, diffusers_transformer
from transformers import Qwen3ForCausalLM

from klein_agent import keymaps, sampling
from klein_agent.autoencoder import AutoEncoder
from klein_agent.configs import AutoencoderConfig, TransformerConfig, preset
from klein_agent.tiny import build_tiny, init_random_
from klein_agent.transformer import Flux2Transformer

ATOL = 1e-5

# A second shape besides tiny: more blocks, 4 heads, unequal RoPE axes are not allowed by the model, so equal ones.
WIDER = TransformerConfig(
    in_channels=32,
    context_in_dim=48,
    hidden_size=96,
    num_heads=4,
    depth=3,
    depth_single_blocks=4,
    axes_dim=(6, 6, 6, 6),
)


@pytest.mark.parametrize("config", [preset("tiny").transformer, WIDER], ids=["tiny", "wider"])
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
    with torch.no_grad():
        got = ours(x, img_ids, ctx, txt_ids, t)
        want = ref(
            hidden_states=x,
            encoder_hidden_states=ctx,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
        )[0]
    assert got.shape == want.shape == (2, tokens, config.in_channels)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        preset("tiny").autoencoder,
        AutoencoderConfig(ch=8, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=6, norm_groups=4),
    ],
    ids=["tiny", "three-levels"],
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

    image = (
        torch.rand(1, 3, 2 * 16 * config.downsample_factor // 2, 3 * 16 * config.downsample_factor // 2) * 2
        - 1
    )
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + config.bn_eps)
    with torch.no_grad():
        got = ours.encode(image)
        want = (Flux2KleinPipeline._patchify_latents(ref.encode(image).latent_dist.mode()) - mean) / std
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
        decoded = ours.decode(got)
        want_decoded = ref.decode(Flux2KleinPipeline._unpatchify_latents(got * std + mean)).sample
    assert decoded.shape == image.shape
    torch.testing.assert_close(decoded, want_decoded, atol=ATOL, rtol=1e-5)


def test_text_embedding_matches_diffusers() -> None:
    _, _, embedder = build_tiny()
    full = Qwen3ForCausalLM(embedder.full_config).eval()
    init_random_(full, torch.Generator().manual_seed(3))  # layers we never run get different values
    kept = {k: v for k, v in embedder.model.state_dict().items() if not k.startswith("rotary_emb.")}
    assert not full.model.load_state_dict(kept, strict=False).unexpected_keys
    prompts = ["a red cube on a table", "", "ünïcödé and <|im_start|> tokens"]
    with torch.no_grad():
        got = embedder(prompts)
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            full, embedder.tokenizer, prompts, hidden_states_layers=list(embedder.output_layers)
        )
    assert got.shape == (3, 512, 3 * embedder.hidden_size)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_text_encoder_runs_only_the_layers_it_needs() -> None:
    _, _, embedder = build_tiny()
    assert embedder.output_layers == (1, 2, 3)
    assert len(embedder.model.layers) == 3  # of the checkpoint's 4
    from klein_agent.configs import text_output_layers

    assert text_output_layers(36) == (9, 18, 27)  # Qwen3-4B and Qwen3-8B


def test_chat_template_matches_qwen3_thinking_off() -> None:
    _, _, embedder = build_tiny()
    text = embedder.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids, mask = embedder.tokenize(["hi"])
    assert ids.shape == (1, 512) and int(mask.sum()) < 512 and ids[0, -1] == embedder.tokenizer.pad_token_id


@pytest.mark.parametrize(
    ("tokens", "steps"), [(16, 4), (1024, 4), (4096, 4), (4080, 4), (16384, 4), (4096, 50), (300, 28)]
)
def test_schedule_matches_diffusers_scheduler(tokens: int, steps: int) -> None:
    assert sampling.empirical_mu(tokens, steps) == pytest.approx(
        compute_empirical_mu(tokens, steps), abs=1e-9
    )
    scheduler = diffusers_scheduler()
    sigmas = [1.0 - i / steps for i in range(steps)]
    scheduler.set_timesteps(sigmas=sigmas, mu=compute_empirical_mu(tokens, steps))
    assert sampling.schedule(steps, tokens) == pytest.approx(scheduler.sigmas.tolist(), abs=1e-6)


def test_schedule_published_values() -> None:
    # flux2-klein-reference.md §5.1: 1024x1024 at 4 steps
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
