"""FLUX 3 [klein] checkpoints written by diffusers itself: a random pipeline of diffusers' and transformers' own
classes, saved by the modular pipeline's `save_pretrained` (modular_model_index.json, component folders).

Parity tests load these in both implementations and call diffusers' modular pipeline with its own defaults, so
nothing of ours decides what the reference sees. Shapes are small but not ours: a 36-layer Qwen3-VL text tower with
a vision tower beside it, a 4-level autoencoder (diffusers' Flux3ImageProcessor hard-codes 16 px per token), and
block and head counts the tests choose.

Without torchvision, transformers 5 cannot build a Qwen3VLProcessor, so diffusers' text step gets the 2-call adapter
it needs (`apply_chat_template` and `.tokenizer`) around the tokenizer it saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux3Transformer2DModel
from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks
from reference_checkpoints import qwen_tokenizer
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

# Qwen3-VL-Instruct's template for one user turn with the generation prompt (no thinking block)
QWEN3_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Flux3Shape:
    text_layers: int = 36
    text_hidden: int = 32
    mode_blocks: int = 2
    joint_blocks: int = 2
    heads: int = 2
    head_dim: int = 16
    distilled: bool = True


def _randomize(module: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
                p.normal_(1.0, 0.1, generator=generator)
            elif p.ndim == 1:
                p.normal_(0.0, 0.02, generator=generator)
            else:
                p.normal_(0.0, scale * p[0].numel() ** -0.5, generator=generator)


def write_flux3_checkpoint(folder: Path, shape: Flux3Shape = Flux3Shape(), seed: int = 0) -> Path:
    """A random FLUX 3 [klein] pipeline (distilled or Base), saved by diffusers' modular `save_pretrained`."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = QWEN3_VL_TEMPLATE
    head = shape.text_hidden // 4
    text = Qwen3VLForConditionalGeneration(
        Qwen3VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=shape.text_hidden,
                intermediate_size=2 * shape.text_hidden,
                num_hidden_layers=shape.text_layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=head,
                max_position_embeddings=1024,
                # Qwen3-VL's interleaved M-RoPE, sections summing to head_dim / 2
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 5_000_000.0,
                    "mrope_section": [head // 4, head // 8, head // 2 - head // 4 - head // 8],
                    "mrope_interleaved": True,
                },
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                num_heads=2,
                intermediate_size=32,
                out_hidden_size=shape.text_hidden,
                deepstack_visual_indexes=[0],
                num_position_embeddings=16,
            ),
        )
    )
    transformer = Flux3Transformer2DModel(
        in_channels=16,
        cond_in_channels=16,
        num_layers=shape.mode_blocks,
        num_single_layers=shape.joint_blocks,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=8 * shape.text_hidden,
        axes_dims_rope=(shape.head_dim // 4,) * 4,
        flow_map=shape.distilled,
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    _randomize(text, generator, 1.0)
    _randomize(transformer, generator, 1.3)
    _randomize(vae, generator, 1.0)
    vae.bn.running_mean.normal_(0.0, 0.1, generator=generator)
    vae.bn.running_var.uniform_(0.5, 1.5, generator=generator)
    blocks = Flux3DistilledAutoBlocks() if shape.distilled else Flux3AutoBlocks()
    pipe = blocks.init_pipeline()
    pipe.update_components(
        transformer=transformer.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer
    )
    pipe.save_pretrained(str(folder), overwrite_modular_index=True)
    return folder


class ProcessorAdapter:
    """The two calls diffusers' Flux3 text step makes on its `tokenizer` component (a Qwen3VLProcessor, which
    transformers cannot build without torchvision), passed through to the tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def load_flux3_reference(folder: Path, distilled: bool, dtype: torch.dtype = torch.float32) -> Any:
    """The checkpoint as diffusers' modular pipeline loads it, the prompt upsampler block removed (it is not part of
    the model compared), every other default left alone."""
    blocks = Flux3DistilledAutoBlocks() if distilled else Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = blocks.init_pipeline(str(folder))
    pipe.load_components(dtype=dtype)
    pipe.tokenizer = ProcessorAdapter(pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
