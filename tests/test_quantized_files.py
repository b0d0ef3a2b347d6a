"""BFL-quantized transformer files: what loading keeps, what it dequantizes, and the files it refuses.

Every refusal must name the file and the key and come before a byte of tensor data is read (the data reader is
replaced by one that fails the test), so a file that declares a tensor the model has no room for costs nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers.quantizers.bfl.utils import dequantize_fp8r, dequantize_nvfp4
from quantized_checkpoints import PREFIX, diffusers_transformer_state, quantize_state
from safetensors.torch import load_file, save_file
from torch import Tensor

from klein_agent.loading import checkpoints, keymaps
from klein_agent.loading.checkpoints import CheckpointError, load_components
from klein_agent.speedups.fp8 import Float8Linear, prequantized_linear_factory

CPU = torch.device("cpu")
LAYER = "double_blocks.0.img_mlp.0"  # a block linear, [2 * 192, 64] in the tiny preset


@pytest.fixture
def folder(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def _bfl_state(folder: Path) -> dict[str, Tensor]:
    return load_file(str(folder / "flux-2-klein.safetensors"))


def _write(folder: Path, kind: str, edit: Callable[[dict[str, Tensor]], None] = lambda s: None) -> Path:
    state = quantize_state(_bfl_state(folder), kind)
    edit(state)
    path = folder / f"klein-{kind}.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture
def no_data_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read before the file was refused")

    monkeypatch.setattr(checkpoints, "read_safetensors", refuse)


BAD_FILES: dict[str, tuple[str, Callable[[dict[str, Tensor]], None], str]] = {
    "fp8r weight without its scale": (
        "fp8r",
        lambda s: s.pop(f"{LAYER}.weight_scale"),
        rf"key '{LAYER}\.weight': it is float8_e4m3fn but has no {LAYER}\.weight_scale",
    ),
    "nvfp4 without input_scale": (
        "nvfp4",
        lambda s: s.pop(f"{LAYER}.input_scale"),
        rf"key '{LAYER}\.weight_scale_2': nvfp4 needs {LAYER}\.input_scale beside it",
    ),
    "nvfp4 global scale without block scale": (
        "nvfp4",
        lambda s: s.pop(f"{LAYER}.weight_scale"),
        rf"key '{LAYER}\.weight_scale_2': it has no {LAYER}\.weight_scale beside it",
    ),
    "fp8r weight stored in bfloat16": (
        "fp8r",
        lambda s: s.update({f"{LAYER}.weight": s[f"{LAYER}.weight"].to(torch.bfloat16)}),
        rf"key '{LAYER}\.weight': it is bfloat16 \[384, 64\], but the fp8r layout stores a 2-D float8_e4m3fn",
    ),
    "fp8r scale of integers": (
        "fp8r",
        lambda s: s.update({f"{LAYER}.weight_scale": s[f"{LAYER}.weight_scale"].to(torch.int32)}),
        rf"key '{LAYER}\.weight_scale': it is int32 \[384\]; the layout wants a floating-point scale per weight row",
    ),
    "fp8r scale one row short": (
        "fp8r",
        lambda s: s.update({f"{LAYER}.weight_scale": s[f"{LAYER}.weight_scale"][:-1]}),
        rf"key '{LAYER}\.weight_scale': it is float32 \[383\]; the layout wants .*shape \[384\]",
    ),
    "nvfp4 block scale in float32": (
        "nvfp4",
        lambda s: s.update({f"{LAYER}.weight_scale": s[f"{LAYER}.weight_scale"].float()}),
        rf"key '{LAYER}\.weight_scale': it is float32 \[384, 4\]; the layout wants a float8_e4m3fn scale",
    ),
    "nvfp4 block scale of the wrong shape": (
        "nvfp4",
        lambda s: s.update({f"{LAYER}.weight_scale": s[f"{LAYER}.weight_scale"][:, :3].contiguous()}),
        rf"key '{LAYER}\.weight_scale': it is float8_e4m3fn \[384, 3\]; .*shape \[384, 4\]",
    ),
    "nvfp4 global scale that is a vector": (
        "nvfp4",
        lambda s: s.update({f"{LAYER}.weight_scale_2": torch.ones(384)}),
        rf"key '{LAYER}\.weight_scale_2': it is float32 \[384\]; the layout wants one floating-point number",
    ),
    "nvfp4 packed weight with inputs that are not whole blocks": (
        "nvfp4",
        lambda s: s.update({f"{LAYER}.weight": s[f"{LAYER}.weight"][:, :-1].contiguous()}),
        rf"key '{LAYER}\.weight': its 62 inputs \(31 bytes of two\) are not a multiple of the 16-input nvfp4 block",
    ),
    "nvfp4 packed weight of another size, scales to match": (
        "nvfp4",
        lambda s: s.update(
            {
                f"{LAYER}.weight": torch.zeros(384, 40, dtype=torch.uint8),
                f"{LAYER}.weight_scale": torch.zeros(384, 5).to(torch.float8_e4m3fn),
            }
        ),
        rf"mis-shaped tensors: {LAYER}\.weight \(384, 80\) \(expected \(384, 64\)\)",
    ),
    "a scale for a weight the file lacks": (
        "fp8r",
        lambda s: s.update({"double_blocks.0.img_mlp.5.weight_scale": torch.ones(4)}),
        r"key 'double_blocks\.0\.img_mlp\.5\.weight_scale': it scales double_blocks\.0\.img_mlp\.5\.weight, which",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.usefixtures("no_data_read")
def test_a_bad_quantized_file_is_refused_naming_file_and_key_before_reading_data(
    case: str, folder: Path
) -> None:
    kind, edit, message = BAD_FILES[case]
    path = _write(folder, kind, edit)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_components(folder, CPU, torch.float32, transformer_file=path)
    assert str(path) in str(caught.value)


def _write_sparse(path: Path, state: dict[str, Tensor], giant: str, shape: list[int]) -> None:
    """`state` plus a float32 tensor `giant` of `shape` that the header declares but the disk never stores (a
    sparse file): reading it would allocate its full size."""
    header: dict[str, object] = {}
    at = 0
    blobs = []
    for key, tensor in state.items():
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}[tensor.dtype]
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    size = 4 * int(torch.tensor(shape).prod())
    header[giant] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + size]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
        f.truncate(8 + len(text) + at + size)


@pytest.mark.usefixtures("no_data_read")
def test_a_scale_declaring_gigabytes_costs_nothing(folder: Path) -> None:
    state = quantize_state(_bfl_state(folder), "fp8r")
    del state[f"{LAYER}.weight_scale"]
    path = folder / "sparse.safetensors"
    _write_sparse(path, state, f"{LAYER}.weight_scale", [2**31])  # 8 GiB declared
    assert path.stat().st_blocks * 512 < 2**30  # the disk holds a few MB: only reading would cost the 8 GiB
    with pytest.raises(CheckpointError, match=rf"key '{LAYER}\.weight_scale': it is float32 \[2147483648\]"):
        load_components(folder, CPU, torch.float32, transformer_file=path)


@pytest.mark.usefixtures("no_data_read")
def test_a_fused_layer_quantized_in_part_is_refused(folder: Path) -> None:
    """The diffusers layout stores q, k and v apart; fp8r q with plain k and v cannot become one FP8 qkv."""
    transformer = folder / "transformer"
    state = diffusers_transformer_state(folder)
    q = "transformer_blocks.0.attn.to_q"
    state.update(quantize_state({f"{q}.weight": state[f"{q}.weight"]}, "fp8r"))  # q alone
    for file in transformer.glob("*.safetensors*"):
        file.unlink()
    save_file(state, str(transformer / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"it is fp8r but a layer it is fused with \(q, k, v\) is stored"
    ):
        load_components(folder, CPU, torch.float32)


@pytest.mark.parametrize("kind", ["fp8r", "nvfp4"])
def test_every_layer_dequantizes_to_diffusers_weights_in_both_layouts(kind: str, folder: Path) -> None:
    """Every linear quantized, the embedders and the final modulation (whose halves the key map swaps) too: the
    loaded weights are exactly diffusers' dequantization of the file, renamed."""
    theirs = diffusers_transformer_state(folder)
    quantized = quantize_state(theirs, kind, every_linear=True)
    dequantized = {}
    for key, tensor in theirs.items():
        prefix = key.removesuffix(".weight")
        if f"{prefix}.weight_scale" not in quantized:
            dequantized[key] = tensor
        elif kind == "fp8r":
            dequantized[key] = dequantize_fp8r(quantized[key], quantized[f"{prefix}.weight_scale"])
        else:
            scales = quantized[f"{prefix}.weight_scale"], quantized[f"{prefix}.weight_scale_2"]
            dequantized[key] = dequantize_nvfp4(quantized[key], *scales)
    want = keymaps.transformer_from_diffusers(dequantized)
    transformer = folder / "transformer"
    for file in transformer.glob("*.safetensors*"):
        file.unlink()
    save_file(quantized, str(transformer / "model.safetensors"))
    parts = load_components(folder, CPU, torch.float32)
    got = parts.transformer.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert parts.quantized is not None and parts.quantized.kinds == (kind,) and parts.quantized.kept_fp8 == 0


def _keep_all(name: str, weight: Tensor, scale: Tensor) -> Float8Linear:
    return Float8Linear(weight, scale, rowwise=True, force_reference=True)


@pytest.mark.parametrize("prefixed", [False, True])
def test_fp8r_layers_are_kept_as_stored_when_fp8_runs(prefixed: bool, folder: Path) -> None:
    """Where FP8 runs, the file's bytes and scales become the FP8 layers as they are (not dequantized and
    requantized); the factory is the GPU's, forced here on the CPU."""
    bfl = quantize_state(_bfl_state(folder), "fp8r")
    path = folder / "fp8r.safetensors"
    save_file({PREFIX + k: v for k, v in bfl.items()} if prefixed else bfl, str(path))
    parts = load_components(folder, CPU, torch.float32, transformer_file=path, fp8_linear=_keep_all)
    layers = {n: m for n, m in parts.transformer.named_modules() if isinstance(m, Float8Linear)}
    assert parts.quantized is not None and len(layers) == parts.quantized.kept_fp8 == parts.quantized.layers
    assert set(layers) == {k.removesuffix(".weight_scale") for k in bfl if k.endswith(".weight_scale")}
    for name, layer in layers.items():
        assert torch.equal(layer.weight.view(torch.uint8), bfl[f"{name}.weight"].view(torch.uint8))
        assert torch.equal(layer.weight_scale[:, 0], bfl[f"{name}.weight_scale"])
    assert parts.transformer.img_in.weight.dtype == torch.float32  # the rest in the model's dtype
    assert parts.quantized.extra_bytes == 0


def test_the_gpu_factory_is_offered_only_where_fp8_runs() -> None:
    assert prequantized_linear_factory(CPU, torch.bfloat16) is None
    assert prequantized_linear_factory(CPU, torch.float32) is None


def test_generate_says_on_stderr_that_it_dequantizes_and_what_it_costs(folder: Path, tmp_path: Path) -> None:
    path = _write(folder, "fp8r")
    out = tmp_path / "pic.png"
    argv = [
        sys.executable,
        "-m",
        "klein_agent",
        "generate",
        "--model",
        str(folder),
        "--transformer-file",
        str(path),
    ]
    argv += [
        "--prompt",
        "a red cube",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if "fp8r weights" in line]
    assert len(notices) == 1, done.stderr
    # 20 block linears of the tiny preset, dequantized from 1 byte (+4 per row) to 4 bytes a weight
    assert "(20 quantized layers): cpu has no FP8 matmul, so they run dequantized to float32" in notices[0]
    assert "MiB more memory than the file's quantized weights" in notices[0]
    assert out.is_file()


def test_where_fp8_runs_a_pipeline_keeps_fp8r_and_feeds_the_files_scales_to_scaled_mm(
    folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The GPU's branch on the CPU: `_scaled_mm` declared available (this torch has a CPU kernel) and spied on.
    Every kept layer multiplies by the file's own per-row scales, with fast accumulation as diffusers'
    BFLFP8RLinear, and the log says the weights stay in FP8."""
    from test_fp8 import cpu_scaled_mm_works

    import klein_agent.speedups.fp8 as fp8
    from klein_agent.pipeline import load_pipeline
    from klein_agent.rules.requests import GenerationRequest

    if not cpu_scaled_mm_works():
        pytest.skip("this PyTorch build has no CPU _scaled_mm")
    path = _write(folder, "fp8r")
    scales = {k: v for k, v in load_file(str(path)).items() if k.endswith(".weight_scale")}
    calls: list[Tensor] = []
    real = torch._scaled_mm

    def spy(a: Tensor, b: Tensor, **kwargs: object) -> Tensor:
        calls.append(kwargs["scale_b"])  # type: ignore[arg-type]
        assert kwargs["use_fast_accum"] is True
        return real(a, b, **{**kwargs, "use_fast_accum": False})  # type: ignore[arg-type]

    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    with caplog.at_level("INFO", logger="klein_agent"):
        pipe = load_pipeline(str(folder), transformer_file=str(path), dtype="bfloat16", device="cpu")
    assert "fp8r weights kept in FP8 (20 layers, rowwise _scaled_mm)" in caplog.text
    kept = {n for n, m in pipe.transformer.named_modules() if isinstance(m, Float8Linear)}
    assert kept == {k.removesuffix(".weight_scale") for k in scales}
    pipe.generate(GenerationRequest("a red cube", 64, 64, seed=1, steps=1))
    assert len(calls) == len(kept)  # one step: each kept layer once
    file_scales = {tuple(s.tolist()) for s in scales.values()}
    assert {tuple(c.reshape(-1).tolist()) for c in calls} == file_scales


def test_with_lora_adapters_fp8r_runs_dequantized_and_says_why(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """LoRA adapters wrap plain linear layers: even where FP8 runs, the fp8r layers are dequantized, and the
    notice names the adapters as the reason."""
    from lora_hostile import AT, sound

    import klein_agent.speedups.fp8 as fp8
    from klein_agent.model.lora import LoRALinear
    from klein_agent.pipeline import load_pipeline
    from klein_agent.rules.requests import GenerationRequest

    path = _write(folder, "fp8r")
    adapter = sound(tmp_path / "style.safetensors")
    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: True)
    with caplog.at_level("INFO", logger="klein_agent"):
        pipe = load_pipeline(
            str(folder),
            transformer_file=str(path),
            dtype="bfloat16",
            device="cpu",
            loras=[(str(adapter), 1.0)],
        )
    assert (
        "LoRA adapters are loaded and run on plain layers only, so they run dequantized to bfloat16"
        in caplog.text
    )
    assert not any(isinstance(m, Float8Linear) for m in pipe.transformer.modules())
    wrapped = pipe.transformer.get_submodule(AT.removeprefix("diffusion_model."))
    assert isinstance(wrapped, LoRALinear) and wrapped.base.weight.dtype == torch.bfloat16
    assert pipe.generate(GenerationRequest("a red cube", 64, 64, seed=1, steps=1)).images
