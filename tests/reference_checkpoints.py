"""Checkpoints written by diffusers itself: a `Flux2KleinPipeline` of random weights, saved with `save_pretrained`.

Parity tests load these in both implementations, so nothing of ours (key maps, config writers, the tiny preset)
decides what the reference sees. Shapes are small but not ours: a 28-layer text encoder, unequal double and
single block counts, autoencoders with and without quant convs, mid-block attention and a smaller decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

# Qwen3's template for one user turn with thinking off renders exactly this (ComfyUI hard-codes the same string).
QWEN3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# The klein repos' scheduler/scheduler_config.json.
KLEIN_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)


@dataclass(frozen=True)
class Shape:
    text_layers: int = 28
    text_hidden: int = 32
    double_blocks: int = 2
    single_blocks: int = 3
    heads: int = 2
    head_dim: int = 16
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    decoder_channels: tuple[int, ...] | None = None
    latent_channels: int = 4
    norm_groups: int = 8
    layers_per_block: int = 1
    quant_convs: bool = True
    mid_attention: bool = True
    distilled: bool = True
    kv: bool = False  # written as a Flux2KleinKVPipeline (klein 9B-KV)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer (no merges) with Qwen3's special tokens and chat template."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    )
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


# Weight scale per component, in units of 1/sqrt(fan-in). Chosen so the prompt matters: with these, another prompt
# moves the picture to ~32 dB and reading text layers 7/14/21 instead of 9/18/27 to ~26 dB, far below the parity
# threshold; with small weights (std 0.05) both stayed above 60 dB and a wrong layer rule went unnoticed.
_WEIGHT_SCALE = {"Qwen3ForCausalLM": 1.0, "Flux2Transformer2DModel": 1.3, "AutoencoderKLFlux2": 0.6}


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    scale = _WEIGHT_SCALE[type(module).__name__]
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
                p.normal_(1.0, 0.1, generator=generator)
            elif p.ndim == 1:
                p.normal_(0.0, 0.02, generator=generator)
            else:
                p.normal_(0.0, scale * p[0].numel() ** -0.5, generator=generator)


def write_reference_checkpoint(folder: Path, shape: Shape = Shape(), seed: int = 0) -> Path:
    """A random FLUX.2 [klein] pipeline built from diffusers' and transformers' own classes, saved by diffusers."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=shape.text_hidden,
            intermediate_size=2 * shape.text_hidden,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=shape.text_hidden // 4,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * shape.latent_channels,
        num_layers=shape.double_blocks,
        num_single_layers=shape.single_blocks,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=3 * shape.text_hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=(shape.head_dim // 4,) * 4,
        guidance_embeds=False,
    )
    levels = len(shape.vae_channels)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=shape.vae_channels,
        decoder_block_out_channels=shape.decoder_channels,
        layers_per_block=shape.layers_per_block,
        latent_channels=shape.latent_channels,
        norm_num_groups=shape.norm_groups,
        use_quant_conv=shape.quant_convs,
        use_post_quant_conv=shape.quant_convs,
        mid_block_add_attention=shape.mid_attention,
    )
    for module in (text, transformer, vae):
        _randomize(module, generator)
    vae.bn.running_mean.normal_(0.0, 0.1, generator=generator)
    vae.bn.running_var.uniform_(0.5, 1.5, generator=generator)
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER),
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        is_distilled=shape.distilled,
    )
    pipe = Flux2KleinKVPipeline(**parts) if shape.kv else Flux2KleinPipeline(**parts)
    pipe.save_pretrained(str(folder))
    return folder


def load_reference(folder: Path) -> Flux2KleinPipeline | Flux2KleinKVPipeline:
    """The checkpoint as diffusers loads it (the pipeline class its model_index.json names), with every default
    (dtype, layers, sizes) left alone."""
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe
