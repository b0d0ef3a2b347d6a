"""BFL's pre-quantized transformers (fp8r, nvfp4) against diffusers' `BFLQuantizationConfig` on the same files.

The files are written by diffusers' own quantize functions from a checkpoint diffusers itself wrote
(`quantized_checkpoints.py`). diffusers 0.42.1 reads them only through `from_single_file` (its `from_pretrained`
fails serialising the config, and its FLUX.2 converter breaks on `model.diffusion_model.` keys), so: the BFL single
file is compared with diffusers on that file; the prefixed file must give the very bytes of the unprefixed one; the
diffusers-layout folder is compared with diffusers reading the same tensors as a state dict. Each case also prints
the PSNR of the quantized picture against the unquantized checkpoint's, the figure the quantization costs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from quantized_checkpoints import (
    KINDS,
    diffusers_transformer_state,
    load_quantized_reference,
    quantize_state,
    write_quantized_folder,
    write_single_file,
)
from reference_checkpoints import Shape, write_reference_checkpoint
from test_pipeline_parity import assert_same_pictures, psnr, run_both

from klein_agent.pipeline import KleinPipeline, load_pipeline
from klein_agent.rules.requests import GenerationRequest

pytestmark = pytest.mark.slow  # whole pipelines against diffusers

REQUESTS = (
    GenerationRequest("a red cube on a blue floor", 80, 48, seed=7, steps=4),
    GenerationRequest("two cats", 48, 64, seed=11, num_images=2, steps=3),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reference_checkpoint(tmp_path_factory.mktemp("quant") / "ckpt", Shape(), seed=0)


@pytest.fixture(scope="module")
def unquantized(checkpoint: Path) -> KleinPipeline:
    return load_pipeline(str(checkpoint))


def _compare(ours: KleinPipeline, theirs: object, unquantized: KleinPipeline | None, label: str) -> None:
    for request in REQUESTS:
        got, want = run_both(ours, theirs, request)  # type: ignore[arg-type]
        assert_same_pictures(got, want)
        if unquantized is not None:
            plain = unquantized.generate(request).images
            for g, p in zip(got, plain, strict=True):
                db = psnr(g, p)
                print(f"{label}: quantized vs unquantized {db:.1f} dB")
                assert db < float("inf")  # the quantized weights really ran


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_matches_diffusers(
    kind: str, checkpoint: Path, unquantized: KleinPipeline, tmp_path: Path
) -> None:
    file = write_single_file(checkpoint, kind, tmp_path / f"klein-{kind}.safetensors")
    ours = load_pipeline(str(checkpoint), transformer_file=str(file))
    theirs = load_quantized_reference(checkpoint, file, compute_dtype=torch.float32)
    _compare(ours, theirs, unquantized, f"{kind} single file, float32")


@pytest.mark.parametrize("kind", KINDS)
def test_prefixed_single_file_is_the_same_model(kind: str, checkpoint: Path, tmp_path: Path) -> None:
    """ComfyUI's `model.diffusion_model.` keys: the same pictures, to the byte, as the unprefixed file."""
    plain = write_single_file(checkpoint, kind, tmp_path / "plain.safetensors")
    prefixed = write_single_file(checkpoint, kind, tmp_path / "prefixed.safetensors", prefixed=True)
    request = REQUESTS[0]
    a = load_pipeline(str(checkpoint), transformer_file=str(plain)).generate(request).images[0]
    b = load_pipeline(str(checkpoint), transformer_file=str(prefixed)).generate(request).images[0]
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_folder_matches_diffusers(
    kind: str, checkpoint: Path, unquantized: KleinPipeline, tmp_path: Path
) -> None:
    folder = write_quantized_folder(checkpoint, kind, tmp_path / "quantized")
    ours = load_pipeline(str(folder))
    state = quantize_state(diffusers_transformer_state(checkpoint), kind)
    theirs = load_quantized_reference(checkpoint, state, compute_dtype=torch.float32)
    _compare(ours, theirs, unquantized, f"{kind} diffusers folder, float32")


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_with_the_reference_default_compute_dtype(
    kind: str, checkpoint: Path, tmp_path: Path
) -> None:
    """`BFLQuantizationConfig()` as a user writes it computes in bfloat16: ours in bfloat16 on the same file."""
    file = write_single_file(checkpoint, kind, tmp_path / f"klein-{kind}.safetensors")
    ours = load_pipeline(str(checkpoint), transformer_file=str(file), dtype="bfloat16")
    theirs = load_quantized_reference(checkpoint, file)
    assert theirs.transformer.dtype == torch.bfloat16
    _compare(ours, theirs, None, f"{kind} single file, bfloat16")


def test_the_check_catches_a_wrong_dequantization(checkpoint: Path, tmp_path: Path) -> None:
    """nvfp4 codes read in the wrong nibble order (the odd element taken from the low nibble) must fail the bound."""
    import klein_agent.loading.quantized as quantized

    file = write_single_file(checkpoint, "nvfp4", tmp_path / "klein-nvfp4.safetensors")
    theirs = load_quantized_reference(checkpoint, file, compute_dtype=torch.float32)
    real = quantized.dequantize

    def swapped_nibbles(layer: quantized.QuantizedLayer, dtype: torch.dtype) -> torch.Tensor:
        if layer.weight.is_meta:
            return real(layer, dtype)
        swapped = ((layer.weight & 0x0F) << 4) | (layer.weight >> 4)
        return real(dataclasses.replace(layer, weight=swapped), dtype)

    quantized.dequantize = swapped_nibbles  # type: ignore[assignment]
    try:
        ours = load_pipeline(str(checkpoint), transformer_file=str(file))
    finally:
        quantized.dequantize = real  # type: ignore[assignment]
    got, want = run_both(ours, theirs, REQUESTS[0])
    print(f"nibbles swapped: {psnr(got[0], want[0]):.1f} dB")
    assert psnr(got[0], want[0]) < 45.0
