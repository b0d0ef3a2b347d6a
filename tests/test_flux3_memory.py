"""The FLUX 3 memory figure (tools/flux3_memory.py) is computed from the real-shape preset on the meta device: its
weights are the parameters diffusers' own `Flux3Transformer2DModel` has at its default (real) config, its phases
grow with the picture, and the distilled model at 1024² in bfloat16 with the text encoder offloaded fits 24 GB."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import Flux3Transformer2DModel
from flux3_memory import flux3_memory  # tools/ is on sys.path (conftest)

from klein_agent.model import configs

BUDGET = 24e9  # issue 21: the distilled model at 1024², bfloat16, text encoder offloaded


def diffusers_parameters(flow_map: bool) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Flux3Transformer2DModel(flow_map=flow_map).parameters())


@pytest.mark.slow  # builds the 5.5 B model and the 4 B text tower on the meta device (about a minute here)
def test_distilled_1024_bf16_offloaded_fits_24_gb_from_the_real_preset() -> None:
    figure = flux3_memory("flux3-klein", 1024, 1024, dtype=torch.bfloat16, offload_text_encoder=True)
    print("\n".join(figure.lines()))
    assert figure.transformer_params == diffusers_parameters(flow_map=True)
    config = configs.PRESETS["flux3-klein"].transformer
    assert isinstance(config, configs.Flux3TransformerConfig)
    qk_scales = (
        (3 * config.depth + config.depth_single_blocks) * 2 * config.head_dim
    )  # kept float32: 2 bytes more
    assert figure.weights["transformer"] == 2 * figure.transformer_params + 2 * qk_scales
    resident = figure.weights["transformer"] + figure.weights["autoencoder"]
    assert all(phase > resident for phase in figure.phases.values())
    assert figure.phases["text"] > resident + figure.weights["text encoder"]  # it visits the device
    assert figure.peak <= BUDGET


def test_the_figure_follows_the_preset_and_the_size(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = configs.PRESETS["flux3-tiny"]
    small = flux3_memory("flux3-tiny", 64, 64, dtype=torch.float32)
    large = flux3_memory("flux3-tiny", 128, 128, dtype=torch.float32)
    assert (
        large.phases["denoise"] > small.phases["denoise"] and large.phases["decode"] > small.phases["decode"]
    )
    assert large.weights == small.weights
    with_ref = flux3_memory("flux3-tiny", 64, 64, references=1, dtype=torch.float32)
    assert with_ref.phases["denoise"] > small.phases["denoise"]
    assert with_ref.phases["references"] > small.phases["references"]
    # one more joint block in the registry: the weights grow by exactly one block's parameters
    config = tiny.transformer
    assert isinstance(config, configs.Flux3TransformerConfig)
    deeper = replace(tiny, transformer=replace(config, depth_single_blocks=config.depth_single_blocks + 1))
    monkeypatch.setitem(configs.PRESETS, "flux3-tiny", deeper)
    grown = flux3_memory("flux3-tiny", 64, 64, dtype=torch.float32)
    d, m = config.hidden_size, config.mlp_hidden
    block = (
        4 * d * d + d * 2 * m + m * d + 2 * config.head_dim
    )  # q, k, v, out; MLP in and out; QK norm scales
    assert grown.transformer_params - small.transformer_params == block
    assert grown.weights["transformer"] - small.weights["transformer"] == 4 * block
    offloaded = flux3_memory("flux3-tiny", 64, 64, dtype=torch.float32, offload_text_encoder=True)
    resident = flux3_memory("flux3-tiny", 64, 64, dtype=torch.float32, offload_text_encoder=False)
    text = offloaded.weights["text encoder"]
    assert resident.phases["decode"] - offloaded.phases["decode"] == text
