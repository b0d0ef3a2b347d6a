"""FLUX 3's text path against diffusers' `Flux3TextEncoderStep` on a Qwen3-VL checkpoint diffusers wrote.

Our embedder reads Qwen3-VL's text tower as a plain Qwen3 model (no torchvision, no vision tower). For text, that
is the same computation, so the check is bit equality, not a tolerance: the window of 80, the padding positions
(1, as transformers 4.57 had them), the template without `enable_thinking`, the eight layers stacked per token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep
from flux3_reference_checkpoints import load_flux3_reference, write_flux3_checkpoint

from klein_agent.loading.flux3_checkpoints import load_flux3_text_embedder
from klein_agent.model.flux3_text_encoder import Flux3TextEmbedder

PROMPTS = {
    "short": "a red cube",
    "two-windows": "a lighthouse on a cliff at dusk, " * 3,  # past 80 tokens: a window of 160
    "unicode": "Café « Ünïcödé » 東京 🌸",
}


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Flux3TextEmbedder, object]:
    folder: Path = write_flux3_checkpoint(tmp_path_factory.mktemp("flux3") / "klein")
    ours = load_flux3_text_embedder(
        folder / "text_encoder", folder / "tokenizer", torch.device("cpu"), torch.float32
    )
    return ours, load_flux3_reference(folder, distilled=True)


def reference(pipe: object, prompt: str, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
            pipe.text_encoder,  # type: ignore[attr-defined]
            pipe.tokenizer,  # type: ignore[attr-defined]
            prompt,
            device=torch.device("cpu"),
            **kwargs,
        )


@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_prompt_embeddings_equal_the_reference_bit_for_bit(
    both: tuple[Flux3TextEmbedder, object], prompt: str
) -> None:
    ours, pipe = both
    want = reference(pipe, prompt)
    got = ours([prompt])
    assert got.shape == want.shape
    assert want.shape[1] % 80 == 0 and want.shape[2] == 8 * 32
    assert torch.equal(got, want)


def test_the_window_is_capped_at_max_length(both: tuple[Flux3TextEmbedder, object]) -> None:
    ours, pipe = both
    prompt = PROMPTS["two-windows"]
    want = reference(pipe, prompt, max_sequence_length=100)
    capped = Flux3TextEmbedder(ours.full_config, ours.tokenizer, max_length=100)
    capped.model = ours.model
    got = capped([prompt])
    assert got.shape[1] == 100
    assert torch.equal(got, want)


def test_the_padding_positions_are_what_the_check_sees(both: tuple[Flux3TextEmbedder, object]) -> None:
    """Self-check: position ids left to transformers (arange for the padding) change the padding rows, and
    equality notices."""
    ours, pipe = both
    want = reference(pipe, PROMPTS["short"])
    ids, mask = ours.tokenize([PROMPTS["short"]])
    assert int(mask.sum()) < ids.shape[1]  # there is padding
    assert not torch.equal(ours.layer_outputs(ids, mask), want)


def test_one_prompt_per_call(both: tuple[Flux3TextEmbedder, object]) -> None:
    with pytest.raises(ValueError, match="one prompt per call"):
        both[0](["a", "b"])


def test_a_shallow_encoder_is_refused_naming_flux3(both: tuple[Flux3TextEmbedder, object]) -> None:
    from klein_agent.model.text_encoder import TextEncoderTooShallowError

    fields = {**both[0].full_config.to_dict(), "num_hidden_layers": 31}
    fields.pop("layer_types", None)
    config = both[0].full_config.__class__.from_dict(fields)
    with pytest.raises(
        TextEncoderTooShallowError, match=r"FLUX 3 \[klein\].*has 31 layers|has 31 layers.*FLUX 3"
    ):
        Flux3TextEmbedder(config, both[0].tokenizer)
