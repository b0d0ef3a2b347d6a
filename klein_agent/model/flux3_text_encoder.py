"""FLUX 3 prompt conditioning: eight Qwen3-VL text-tower layers, stacked per token, in a window of 80 tokens.

For text alone, Qwen3-VL's three M-RoPE rows carry the same position, so its text tower is a plain Qwen3 model built
from its `text_config` with the `model.language_model.*` weights (checked bit for bit in
tests/test_flux3_text_encoder.py). So this reuses our Qwen3 embedder (`text_encoder.TextEmbedder`) with FLUX 3's
rules, from diffusers `Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds` (0.42.1):

- the chat template with one user turn and the generation prompt, *without* `enable_thinking` (FLUX.2 passes False);
- one prompt per call, truncated at 8192 tokens, right-padded to a multiple of 80 (the window is part of the
  model's recipe: the transformer attends to the padding);
- explicit position ids `arange(window)` with every padding position set to 1, as transformers 4.57 (the training
  environment) computed them; the attention mask applies inside Qwen3-VL only;
- `hidden_states[4], [8], ..., [32]` stacked per token: 8 x 2560 = 20480 channels for the real encoder.

No torchvision is needed: the tokenizer is loaded as a tokenizer, not as a `Qwen3VLProcessor`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase, Qwen3Config

from klein_agent.model.configs import FLUX3_TEXT_OUTPUT_LAYERS
from klein_agent.model.text_encoder import TextEmbedder
from klein_agent.rules import limits

PADDING_POSITION = 1  # transformers 4.57's position id for padding tokens, which FLUX 3 was trained with


class Flux3TextEmbedder(TextEmbedder):
    """A prompt -> [1, window, 8 * hidden] conditioning, in the encoder's dtype (window: the prompt's token count
    rounded up to a multiple of 80, at most 8192).

    Raises TextEncoderTooShallowError for an encoder of fewer than 32 layers."""

    conditioned_model = "FLUX 3 [klein]"
    reference_code = "diffusers' Flux3TextEncoderStep"

    def __init__(
        self,
        config: Qwen3Config,
        tokenizer: PreTrainedTokenizerBase,
        window: int = limits.FLUX3_TEXT_WINDOW,
        max_length: int = limits.FLUX3_MAX_TEXT_TOKENS,
    ) -> None:
        super().__init__(config, tokenizer, max_length=max_length, output_layers=FLUX3_TEXT_OUTPUT_LAYERS)
        self.window = window

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """One prompt in the chat template, cut at `max_length`, right-padded to a multiple of `window` (capped at
        `max_length`). Returns `input_ids` and `attention_mask`, each [1, padded length] int64 on the CPU.

        Raises ValueError for more or fewer than one prompt: the window is sized per prompt."""
        if len(prompts) != 1:
            raise ValueError(
                f"FLUX 3 encodes one prompt per call (its window is per prompt), got {len(prompts)}"
            )
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompts[0]}], tokenize=False, add_generation_prompt=True
        )
        length = len(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])
        padded = min(math.ceil(length / self.window) * self.window, self.max_length)
        batch = self.tokenizer(
            text,
            return_tensors="pt",
            padding="max_length",
            padding_side="right",
            truncation=True,
            max_length=padded,
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.inference_mode()
    def forward(self, prompts: list[str]) -> Tensor:  # -> [1, window, 8 * hidden]
        """Embed one prompt (a list of one, as FLUX.2's embedder takes a batch)."""
        input_ids, attention_mask = self.tokenize(prompts)
        positions = torch.arange(input_ids.shape[1])[None].masked_fill(attention_mask == 0, PADDING_POSITION)
        return self.layer_outputs(input_ids, attention_mask, positions)
