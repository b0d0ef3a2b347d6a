"""A deterministic tiny random FLUX.2 [klein] built in memory: every code path runs on any machine without weights.

The weights come from a fixed seed, so `--model tiny` gives the same (noise) pictures on every machine. The tokenizer
is byte-level with Qwen3's special tokens and the same chat-template output as Qwen3 with thinking off.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import Flux3TransformerConfig, ModelPreset, TransformerConfig, preset
from klein_agent.model.flux3_text_encoder import Flux3TextEmbedder
from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.model.text_encoder import TextEmbedder, qwen3_config
from klein_agent.model.transformer import Flux2Transformer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Renders exactly what Qwen3's template renders for one user turn with add_generation_prompt and thinking off:
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: one token per UTF-8 byte, then the special tokens."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="right",
        model_max_length=131072,
    )
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def init_random_(module: nn.Module, generator: torch.Generator | None, std: float = 0.05) -> None:
    """Fill every parameter in place from `generator`: normal weights scaled by fan-in, norms near one."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1 and ("norm" in name or name.endswith("scale")):
                param.normal_(1.0, 0.1, generator=generator)
            elif param.ndim == 1:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.normal_(0.0, min(std, param[0].numel() ** -0.5), generator=generator)


def build_random_models(
    model_preset: ModelPreset,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Flux2Transformer, AutoEncoder, TextEmbedder]:
    """Random weights of a preset's shape, reproducible from `seed` on a given device. Used for `tiny` and for
    benchmarks of the real shapes (speed does not depend on the values); built on the meta device and filled in
    place on the target, so a 4B model never passes through host memory."""
    if not isinstance(model_preset.transformer, TransformerConfig):
        raise ValueError(f"{model_preset.name} is a FLUX 3 preset: build it with build_random_flux3")
    device = torch.device(device)
    # the meta device (shape-only builds) has no generator and nothing to fill
    generator = None if device.type == "meta" else torch.Generator(device).manual_seed(seed)
    tokenizer = tiny_tokenizer()
    if model_preset.text_encoder.vocab_size < len(tokenizer):
        raise ValueError("the preset's vocabulary is smaller than the tiny tokenizer")
    text_config = qwen3_config(model_preset.text_encoder, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        transformer = Flux2Transformer(model_preset.transformer)
        autoencoder = AutoEncoder(model_preset.autoencoder)
        text = TextEmbedder(text_config, tokenizer)
    for module in (transformer, autoencoder, text):
        module.to_empty(device=device)
        module.to(dtype)
        init_random_(module, generator)
        module.eval()
    text.reset_rotary(device)
    bn = autoencoder.bn
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    bn.running_mean.normal_(0.0, 0.1, generator=generator)
    bn.running_var.uniform_(0.5, 1.5, generator=generator)
    bn.num_batches_tracked.zero_()
    return transformer, autoencoder, text


def build_tiny(seed: int = 0) -> tuple[Flux2Transformer, AutoEncoder, TextEmbedder]:
    """The `tiny` preset with random weights from `seed`, float32 on the CPU."""
    return build_random_models(preset("tiny"), seed)


def build_random_flux3(
    model_preset: ModelPreset,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Flux3Transformer, AutoEncoder, Flux3TextEmbedder]:
    """Random weights of a FLUX 3 preset's shape, as `build_random_models` makes FLUX.2's (on the meta device and
    filled in place on the target: `device="meta"` sizes the real 5.5 B model without memory). The QK norms' scales
    stay float32, as a loaded checkpoint's do. Raises ValueError for a FLUX.2 preset."""
    config = model_preset.transformer
    if not isinstance(config, Flux3TransformerConfig):
        raise ValueError(f"{model_preset.name} is a FLUX.2 preset: build it with build_random_models")
    device = torch.device(device)
    generator = None if device.type == "meta" else torch.Generator(device).manual_seed(seed)
    tokenizer = tiny_tokenizer()
    if model_preset.text_encoder.vocab_size < len(tokenizer):
        raise ValueError("the preset's vocabulary is smaller than the tiny tokenizer")
    text_config = qwen3_config(model_preset.text_encoder, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        transformer = Flux3Transformer(config)
        autoencoder = AutoEncoder(model_preset.autoencoder)
        text = Flux3TextEmbedder(text_config, tokenizer)
    for module in (transformer, autoencoder, text):
        module.to_empty(device=device)
        module.to(dtype)
        init_random_(module, generator)
        module.eval()
    for name, param in transformer.named_parameters():
        if name.endswith(("query_norm.scale", "key_norm.scale")):
            param.data = param.data.float()
    text.reset_rotary(device)
    bn = autoencoder.bn
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    bn.running_mean.normal_(0.0, 0.1, generator=generator)
    bn.running_var.uniform_(0.5, 1.5, generator=generator)
    bn.num_batches_tracked.zero_()
    return transformer, autoencoder, text
