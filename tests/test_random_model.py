"""`--model random:PRESET`: random weights of a preset's shape (tools/gpu_check.sh serves the 4B's shape with it)."""

from __future__ import annotations

import pytest
import torch

from klein_agent.pipeline import load_pipeline


def test_random_preset_builds_that_shape_and_equals_tiny_for_tiny() -> None:
    pipe = load_pipeline("random:tiny", device="cpu")
    assert pipe.info.model == "random:tiny" and pipe.info.variant == "tiny"
    tiny = load_pipeline("tiny", device="cpu")
    assert all(
        torch.equal(v, tiny.transformer.state_dict()[k]) for k, v in pipe.transformer.state_dict().items()
    )


def test_unknown_preset_is_refused_naming_the_presets() -> None:
    with pytest.raises(ValueError, match=r"no preset 'klein-99b'; choose one of .*klein-4b"):
        load_pipeline("random:klein-99b", device="cpu")
