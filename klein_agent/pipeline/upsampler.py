"""The FLUX 3 prompt upsampler, run as diffusers' upsampler block runs it: a request (and an edit's references)
in, the caption FLUX 3 encodes out.

The model is BFL's Qwen3.5 fine-tune (`black-forest-labs/flux-3-image-klein-pup`), loaded with transformers'
`Qwen3_5ForConditionalGeneration`, the class diffusers' block names. Its processor is not: transformers 5 builds a
Qwen3.5 processor (`Qwen3VLProcessor`) only with torchvision, for a video processor the upsampler never uses, and
torchvision does not import beside the CPU torch. So `UpsamplerInputs` does the processor's work for text and
pictures with the parts that need no torchvision: the checkpoint's tokenizer and chat template, and transformers'
PIL image processor (`Qwen2VLImageProcessorPil`, the class transformers' own table names for qwen3_5 without
torchvision). tests/test_upsampler_parity.py checks the tensors equal `Qwen3VLProcessor`'s and the captions equal
diffusers' block's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from klein_agent.loading.errors import CheckpointError
from klein_agent.loading.upsampler_source import check_upsampler_files
from klein_agent.rules import limits, upsampling
from klein_agent.rules.layout import LayoutBox, reconcile


class UpsamplerInputs:
    """The upsampler's processor for what diffusers' block sends it: a chat of text parts and pictures, rendered
    by the checkpoint's chat template (thinking off, the assistant turn opened), each picture's placeholder
    expanded to its merged patch count, and the tensors the model takes (ids, mask, pixel values, grid sizes,
    and the multimodal token types M-RoPE reads)."""

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, chat: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tensors for one chat, batch 1: input_ids, attention_mask, mm_token_type_ids [1, L] (int64); with
        pictures also pixel_values [patches, C·T·P·P] (float32) and image_grid_thw [pictures, 3]."""
        text: str = self.tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        pictures = [part["image"] for turn in chat for part in turn["content"] if part["type"] == "image"]
        out: dict[str, torch.Tensor] = {}
        if pictures:
            vision = self.image_processor(images=pictures, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            merged = self.image_processor.merge_size**2
            pieces = text.split(self.image_token)
            if len(pieces) != len(pictures) + 1:
                raise CheckpointError(
                    f"the prompt upsampler's chat template wrote {len(pieces) - 1} picture placeholders "
                    f"({self.image_token}) for {len(pictures)} pictures; its chat_template does not fit this model"
                )
            counts = [int(grid.prod()) // merged for grid in vision["image_grid_thw"]]
            text = pieces[0] + "".join(
                self.image_token * n + rest for n, rest in zip(counts, pieces[1:], strict=True)
            )
        tokens = self.tokenizer(text, return_tensors="pt", return_token_type_ids=False)
        out["input_ids"], out["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        # 1 marks a picture's token (M-RoPE gives those 2-D positions), 0 text; the processor sends it always
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).to(out["input_ids"].dtype)
        return out

    def decode(self, ids: torch.Tensor) -> str:
        """The text of generated ids [N], special tokens dropped, stripped."""
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.strip()


class PromptUpsampler:
    """A loaded upsampler: `caption(request, references)` is the caption diffusers' block would write (greedy,
    at most limits.UPSAMPLER_MAX_NEW_TOKENS new tokens)."""

    def __init__(self, model: Any, inputs: UpsamplerInputs, source: str) -> None:
        self.model = model
        self.inputs = inputs
        self.source = source  # the folder or repo id as given, for recipes and messages

    @torch.no_grad()
    def caption(
        self,
        request: str,
        references: list[Image.Image] | None = None,
        *,
        layout: Sequence[LayoutBox] = (),
        max_new_tokens: int = limits.UPSAMPLER_MAX_NEW_TOKENS,
    ) -> str:
        """The caption for `request`: text-to-image without references, else written from them (an edit or a
        compose; the references as the call received them, prepared here as the upsampler saw them in training).
        With `layout` (checked boxes, `rules.layout`) the box mode: the caption ends in the box table, the given
        boxes put back as they were (`layout.reconcile`).

        Raises ValueError for more than 10 references or one over 200:1, RuntimeError when the upsampler writes
        an empty caption (a broken checkpoint: the request is then not captioned, never silently passed on)."""
        prepared = upsampling.prepare_references(list(references or []))
        rows = upsampling.layout_rows(layout, len(prepared)) if layout else None
        tensors = self.inputs(upsampling.messages(request, prepared, rows))
        device = next(self.model.parameters()).device
        tensors = {key: value.to(device) for key, value in tensors.items()}
        generated = self.model.generate(**tensors, max_new_tokens=max_new_tokens, do_sample=False)
        caption = self.inputs.decode(generated[0, tensors["input_ids"].shape[1] :])
        if not caption:
            raise RuntimeError(
                f"the prompt upsampler {self.source} wrote an empty caption for this request; check the checkpoint, "
                "or pass the caption yourself (--caption)"
            )
        return reconcile(caption, rows) if rows else caption


def load_upsampler(
    source: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> PromptUpsampler:
    """The upsampler `--prompt-upsampler` names: a folder, or a repo id in the local Hugging Face cache, holding
    config.json (a qwen3_5 model), its weights, the tokenizer with its chat template and preprocessor_config.json.

    Raises CheckpointError naming the flag, the folder and what is missing or wrong."""
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder: Path = check_upsampler_files(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
        model = Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"--prompt-upsampler {source}: could not load it from {folder} ({err})"
        ) from err
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            f"--prompt-upsampler {source}: {folder} has no chat template (chat_template.jinja or "
            "tokenizer_config.json's chat_template); the upsampler's requests are chats"
        )
    torch.nn.Module.to(model, device).eval()  # transformers' typed `to` takes no plain device string
    print(f"klein-agent: prompt upsampler {source} loaded ({folder})", file=sys.stderr)
    return PromptUpsampler(model, UpsamplerInputs(tokenizer, image_processor), source)
