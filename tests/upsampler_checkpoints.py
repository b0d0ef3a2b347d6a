"""A tiny FLUX 3 prompt upsampler written by transformers itself: a random `Qwen3_5ForConditionalGeneration` (the
class diffusers' upsampler block loads; hybrid linear and full attention layers, a vision tower) saved with
`save_pretrained`, beside a byte-level tokenizer with Qwen's special tokens and vision placeholders, a chat template
that renders lists of text and image parts as Qwen3.5's does, and the PIL image processor's config.

Without torchvision, transformers 5 cannot build the `Qwen3VLProcessor` diffusers' block calls (its video processor
needs torchvision, and `ProcessorMixin` checks every slot's class). `reference_processor` builds the real one with
that one check skipped for the empty video slot, so the reference is transformers' own processor code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer, Qwen3_5Config, Qwen3_5ForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

# Qwen3.5's chat template for content given as parts: images become <|vision_start|><|image_pad|><|vision_end|>
UPSAMPLER_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def byte_characters() -> dict[int, str]:
    """Byte-level BPE's byte -> character map (GPT-2's `bytes_to_unicode`: printable bytes stand for themselves,
    the rest are shifted past 255), the alphabet `pre_tokenizers.ByteLevel` uses."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + k) for k, b in enumerate(shifted)}}


# Bytes whose text the caption rule (`rules.upsampling.clean_caption`) would change: ASCII controls, space (a caption
# ending in it is stripped), DEL, and 0xC2 (the lead byte of U+0080-U+009F, the C1 controls, and of U+00A0)
UNCLEAN_BYTES = [*range(0x21), 0x7F, 0xC2]


def write_tiny_upsampler(folder: Path, seed: int = 0, clean_text: bool = False) -> Path:
    """A random Qwen3.5 upsampler (4 text layers: 3 linear-attention, 1 full; a 2-block vision tower with
    Qwen3.5's 16-px patches merged 2x2) with its tokenizer and preprocessor config, saved into `folder`; its
    generation stops at <|im_end|> or any of 1 in 8 byte tokens. With `clean_text` its generation config also
    suppresses `UNCLEAN_BYTES`, so its captions are text the caption rule keeps as written (a real upsampler writes
    prose; a random one writes any byte)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    assert set(byte_characters().values()) == set(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=SPECIAL + VISION)
    tokenizer.chat_template = UPSAMPLER_TEMPLATE
    im_end, image, video, start, end = tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", *VISION[2:], *VISION[:2]]
    )
    config = Qwen3_5Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            eos_token_id=im_end,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=64,
        ),
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    # transformers' init (std 0.02, unit norms) makes every greedy step pick token 0 whatever the input: weights
    # at 1/sqrt(fan-in) and jittered vectors make the caption depend on the request and the pictures
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape) * 0.1)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
    # A random model rarely writes <|im_end|>, and both sides ask for up to 3584 tokens (minutes on this CPU): the
    # checkpoint's own generation config also stops at every 8th byte token, so a caption ends after ~8 tokens.
    # Both implementations read it from the checkpoint; neither is told.
    model.generation_config.eos_token_id = [im_end, *range(5, len(vocab), 8)]
    if clean_text:  # read from the checkpoint by both implementations, as the stop tokens are
        model.generation_config.suppress_tokens = [vocab[byte_characters()[b]] for b in UNCLEAN_BYTES]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Qwen3.5's preprocessing: 16-px patches, 2x2 merge, two frames per patch, mean/std 0.5, at least 256² pixels
    Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    ).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def _video_slot_unchecked() -> Iterator[None]:
    original = ProcessorMixin.check_argument_for_proper_class

    def check(self: Any, name: str, argument: Any) -> Any:
        return None if name == "video_processor" and argument is None else original(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = check  # type: ignore[method-assign]
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original  # type: ignore[method-assign]


def reference_processor(folder: Path) -> Qwen3VLProcessor:
    """transformers' `Qwen3VLProcessor` over the saved tokenizer and PIL image processor (no video processor)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with _video_slot_unchecked():
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=tokenizer.chat_template,
        )


def load_reference_upsampler(folder: Path) -> Qwen3_5ForConditionalGeneration:
    """The saved upsampler, loaded by transformers as diffusers' block would get it."""
    return Qwen3_5ForConditionalGeneration.from_pretrained(folder).eval()
