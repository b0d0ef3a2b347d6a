"""Prompt conditioning: Qwen3 hidden states from three intermediate layers, concatenated per token.

The prompt goes through Qwen3's chat template with thinking off, is padded to 512 tokens (the attention mask is used
inside Qwen3 only), and the outputs of decoder layers 9, 18 and 27 are concatenated per token, whatever the encoder's
depth (BFL `text_encoder.py` Qwen3Embedder; diffusers `Flux2KleinPipeline._get_qwen3_prompt_embeds`). Layers past
27 are never built, so the 36-layer encoders of the 4B and 9B run 27 layers.

Those outputs are the raw residual stream, before the final RMSNorm: diffusers reads `hidden_states[k]`, and
transformers replaces only the *last* entry with the normed output. So for an encoder of exactly 27 layers the
reference takes layer 27 after the final norm, and so do we.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, Qwen3Config, Qwen3Model

from klein_agent.model.configs import TEXT_OUTPUT_LAYERS, TextEncoderConfig

MAX_LENGTH = 512


class TextEncoderTooShallowError(ValueError):
    """The encoder has fewer layers than the conditioning reads."""


class TextEmbedder(nn.Module):
    """Prompts -> [B, 512, 3 * hidden] conditioning, in the encoder's dtype.

    Mirrors diffusers `Flux2KleinPipeline._get_qwen3_prompt_embeds` (and BFL `Qwen3Embedder`). Raises
    TextEncoderTooShallowError when `config` has fewer than 27 layers (the reference cannot run such an encoder either).
    """

    # which model reads these layers, and whose code reads them: the too-shallow error names both
    conditioned_model = "FLUX.2 [klein]"
    reference_code = "BFL's code and diffusers' Flux2KleinPipeline"

    def __init__(
        self,
        config: Qwen3Config,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = MAX_LENGTH,
        output_layers: tuple[int, ...] = TEXT_OUTPUT_LAYERS,
    ) -> None:
        super().__init__()
        depth = config.num_hidden_layers
        self.output_layers = output_layers
        kept = self.output_layers[-1]
        if depth < kept:
            raise TextEncoderTooShallowError(
                f"the text encoder has {depth} layers, but {self.conditioned_model} is conditioned on the outputs "
                f"of layers {', '.join(map(str, self.output_layers))} (as {self.reference_code} are), "
                f"so it needs at least {kept}: this is not its text encoder"
            )
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.full_config = config  # the checkpoint's own, all layers; kept for writing checkpoints back
        fields = config.to_dict()
        fields["num_hidden_layers"] = kept
        if fields.get("layer_types"):
            fields["layer_types"] = fields["layer_types"][:kept]
        truncated = Qwen3Config.from_dict(fields)
        truncated._attn_implementation = "sdpa"
        self.model = Qwen3Model(truncated)
        # the final norm applies only when the last layer read is the encoder's last (see the module docstring)
        self.final_norm_on_last = depth == kept
        if not self.final_norm_on_last:
            self.model.norm = nn.Identity()  # type: ignore[assignment]
        self.hidden_size = config.hidden_size

    @property
    def output_dim(self) -> int:
        """Channels per conditioning token: the output layers' hidden size (7680 for klein 4B, 12288 for 9B)."""
        return len(self.output_layers) * self.hidden_size

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Each prompt in Qwen3's chat template (one user turn, thinking off), padded and cut to `max_length`.

        Returns `input_ids` and `attention_mask`, each [B, max_length] int64 on the CPU, as diffusers
        `Flux2KleinPipeline._get_qwen3_prompt_embeds` tokenises.
        """
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for p in prompts
        ]
        batch = self.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.inference_mode()
    def forward(self, prompts: list[str]) -> Tensor:  # -> [B, 512, 3 * hidden]
        """Embed `prompts` (any text; the template's special tokens in it are tokenised as the reference does)."""
        input_ids, attention_mask = self.tokenize(prompts)
        return self.layer_outputs(input_ids, attention_mask)

    def layer_outputs(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        """Token ids and mask [B, S] (and optional position ids [B, S]) -> the output layers' hidden states,
        concatenated per token in layer order: [B, S, len(output_layers) * hidden], in the encoder's dtype."""
        device = self.model.embed_tokens.weight.device
        captured: dict[int, Tensor] = {}
        hooks = [
            self.model.layers[n - 1].register_forward_hook(_capture(captured, n)) for n in self.output_layers
        ]
        try:
            self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=None if position_ids is None else position_ids.to(device),
                use_cache=False,
            )
        finally:
            for hook in hooks:
                hook.remove()
        if self.final_norm_on_last:
            last = self.output_layers[-1]
            captured[last] = self.model.norm(captured[last])
        return torch.cat([captured[n] for n in self.output_layers], dim=-1)  # layer-major per token

    def reset_rotary(self, device: torch.device) -> None:
        """Recompute the rotary buffers, which are not in checkpoints and stay empty after a meta-device build."""
        rotary = type(self.model.rotary_emb)(config=self.model.config)
        self.model.rotary_emb = rotary.to(device)


def _capture(store: dict[int, Tensor], layer: int) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[layer] = output[0] if isinstance(output, tuple) else output

    return hook


def qwen3_config(config: TextEncoderConfig, pad_token_id: int | None = None) -> Qwen3Config:
    """A transformers `Qwen3Config` of a preset's sizes, for random-weight encoders (tied embeddings)."""
    fields: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
    )
    return Qwen3Config(**fields)


def checkpoint_key(ours: str) -> str:
    """Our module's keys -> Qwen3ForCausalLM checkpoint keys."""
    return "model." + ours


def skipped_checkpoint_key(key: str, num_layers_kept: int, keep_final_norm: bool = False) -> bool:
    """Keys a Qwen3ForCausalLM checkpoint has that we deliberately do not load: later layers, the LM head, and the
    final norm unless it is used (`keep_final_norm`)."""
    if key.startswith("lm_head.") or (key == "model.norm.weight" and not keep_final_norm):
        return True
    parts = key.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and int(parts[2]) >= num_layers_kept
