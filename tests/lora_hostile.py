"""Hostile LoRA and LoKr files for the tiny preset: each builder writes one file and says which key the refusal
must name.

Shared by tests/test_lora_hostile.py (every file through the loader, some through the real CLI and `serve`) and
tools/lora_hostile_survey.py (the before/after count). Layers used: double_blocks.0.img_attn.proj (64 -> 64) and
double_blocks.0.img_attn.qkv (64 -> 192).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

D, RANK = 64, 4
AT = "diffusion_model.double_blocks.0.img_attn.proj"  # ai-toolkit layer prefix
A, B = f"{AT}.lora_A.weight", f"{AT}.lora_B.weight"
KOHYA = "lora_unet_double_blocks_0_img_attn_proj"
KA, KB, KALPHA = f"{KOHYA}.lora_down.weight", f"{KOHYA}.lora_up.weight", f"{KOHYA}.alpha"
DF = "transformer.transformer_blocks.0.attn.to_out.0"  # the same layer, diffusers' name
DA, DB = f"{DF}.lora_A.weight", f"{DF}.lora_B.weight"
SPARSE_BYTES = 10 * 1024**3  # what the sparse file declares
# LoKr: the same layer, BFL layout (w1 [8, 8] ⊗ w2 [8, 8] = 64 x 64), and LyCORIS' name for it
K1, K2 = f"{AT}.lokr_w1", f"{AT}.lokr_w2"
K1A, K1B, K2A, K2B = f"{AT}.lokr_w1_a", f"{AT}.lokr_w1_b", f"{AT}.lokr_w2_a", f"{AT}.lokr_w2_b"
KR_ALPHA = f"{AT}.alpha"
LYCORIS = "lycoris_transformer_blocks_0_attn_to_out_0"
SPARSE_FACTOR = 16384  # each factor [16384, 16384] of float32 (1 GiB, a hole): their product 2^28 x 2^28


def pair(scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A sound (down, up) pair for a 64 -> 64 layer, up multiplied by `scale`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, D, generator=g) * D**-0.5, torch.randn(D, RANK, generator=g) * 0.1 * scale


def sound(path: Path) -> Path:
    """The file the hostile ones are variations of: ai-toolkit, one layer."""
    down, up = pair()
    save_file({A: down, B: up}, str(path))
    return path


def raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> None:
    """A safetensors file written by hand: the 8-byte length (default: the header's), the header, the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + text + data)


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def two(
    path: Path, a: torch.Tensor, b: torch.Tensor, keys: tuple[str, str] = (A, B), **extra: torch.Tensor
) -> None:
    save_file({keys[0]: a.contiguous(), keys[1]: b.contiguous(), **extra}, str(path))


def kohya(path: Path, alpha: torch.Tensor) -> None:
    down, up = pair()
    save_file({KA: down, KB: up, KALPHA: alpha}, str(path))


def diffusers(path: Path, config: object) -> None:
    down, up = pair()
    meta = config if isinstance(config, str) else json.dumps(config)
    save_file({DA: down, DB: up}, str(path), metadata={"lora_adapter_metadata": meta})


def factors(scale: float = 1.0, seed: int = 0, rank: int = 0) -> dict[str, torch.Tensor]:
    """A sound LoKr layer for the 64 -> 64 layer (BFL layout): w1 [8, 8] and w2 [8, 8], w2 rank-decomposed when
    `rank` > 0; w2 multiplied by `scale`."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(8, 8, generator=g) / 8
    if not rank:
        return {K1: w1, K2: torch.randn(8, 8, generator=g) / 8 * scale}
    return {
        K1: w1,
        K2A: torch.randn(8, rank, generator=g) * scale,
        K2B: torch.randn(rank, 8, generator=g) / 8,
    }


def lokr(path: Path, drop: tuple[str, ...] = (), **tensors: torch.Tensor) -> None:
    """A LoKr file: `factors()` (rank 2 when a decomposed key is given) with `tensors` (keys from the K* names,
    `_` for `.`) replacing or adding, `drop` removed."""
    given = {key.replace("__", "."): value for key, value in tensors.items()}
    base = factors(rank=2 if any(k.endswith(("_a", "_b")) for k in given) else 0)
    save_file({k: v.contiguous() for k, v in (base | given).items() if k not in drop}, str(path))


def _lokr_sparse(path: Path) -> None:
    """4 KB on disk, 2 GiB declared: two [16384, 16384] factors whose product would be 2^28 x 2^28."""
    n = SPARSE_FACTOR * SPARSE_FACTOR * 4
    raw(path, {K1: entry("F32", [SPARSE_FACTOR] * 2, 0, n), K2: entry("F32", [SPARSE_FACTOR] * 2, n, 2 * n)})
    os.truncate(path, path.stat().st_size + 2 * n)


def _truncated_data(path: Path) -> None:
    sound(path)
    path.write_bytes(path.read_bytes()[:-100])


def _sparse(path: Path) -> None:
    """4 KB on disk, 10 GiB declared: an up matrix with as many rows as 10 GiB of float32 holds."""
    down_bytes = RANK * D * 4
    rows = (SPARSE_BYTES - down_bytes) // (RANK * 4)
    header = {
        A: entry("F32", [RANK, D], 0, down_bytes),
        B: entry("F32", [rows, RANK], down_bytes, down_bytes + rows * RANK * 4),
    }
    raw(path, header, pair()[0].numpy().tobytes())
    os.truncate(path, path.stat().st_size + rows * RANK * 4)  # a hole: no disk blocks


def _png(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)


def _pickle(path: Path) -> None:
    torch.save({A: pair()[0]}, str(path))


# name -> (builder, the key the message must name, or None for a file-level refusal)
Builder = Callable[[Path], object]
CASES: dict[str, tuple[Builder, str | None]] = {
    # the container
    "empty file": (lambda p: p.write_bytes(b""), None),
    "shorter than a length": (lambda p: p.write_bytes(b"\x10\0\0"), None),
    "truncated header": (lambda p: raw(p, b'{"a": 1', length=4000), None),
    "truncated data": (_truncated_data, None),
    "header length 2^63": (lambda p: raw(p, b"{}", length=2**63), None),
    "header length 1e9": (lambda p: raw(p, b"{}", length=10**9), None),
    "header not JSON": (lambda p: raw(p, b"this is not json"), None),
    "header not UTF-8": (lambda p: raw(p, b'{"\xff\xfe": 1}'), None),
    "header a list": (lambda p: raw(p, [1, 2, 3]), None),
    "header 100k deep": (lambda p: raw(p, b"[" * 100_000 + b"]" * 100_000), None),
    "header key twice": (
        lambda p: raw(p, b'{"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "x": {}}'),
        None,
    ),
    "header __metadata__ a list": (
        lambda p: raw(p, {"__metadata__": [1], A: entry("F32", [1], 0, 4)}, b"\0" * 4),
        "__metadata__",
    ),
    "metadata not strings": (
        lambda p: raw(p, {"__metadata__": {"a": 1}, A: entry("F32", [1], 0, 4)}, b"\0" * 4),
        "__metadata__",
    ),
    "entry not an object": (lambda p: raw(p, {A: 5}), A),
    "unknown dtype": (lambda p: raw(p, {A: entry("F99", [1], 0, 4)}, b"\0" * 4), A),
    "negative size": (lambda p: raw(p, {A: entry("F32", [-1, 4], 0, 0)}), A),
    "offsets past the end": (lambda p: raw(p, {A: entry("F32", [4, 64], 0, 1024)}, b"\0" * 16), None),
    "offsets not the shape's bytes": (lambda p: raw(p, {A: entry("F32", [4, 64], 0, 16)}, b"\0" * 16), A),
    "hole in the data": (lambda p: raw(p, {A: entry("F32", [1], 4, 8)}, b"\0" * 8), A),
    "PNG renamed": (_png, None),
    "pickle renamed": (_pickle, None),
    "no tensors": (lambda p: raw(p, {}), None),
    # names
    "not a LoRA key": (lambda p: save_file({f"{AT}.weight": torch.zeros(D, D)}, str(p)), f"{AT}.weight"),
    "no up weight": (lambda p: save_file({A: pair()[0]}, str(p)), A),
    "unknown layer": (
        lambda p: two(p, *pair(), keys=(A.replace(".0.", ".7."), B.replace(".0.", ".7."))),
        A.replace(".0.", ".7."),
    ),
    "text encoder key in kohya": (
        lambda p: save_file(
            {KA: pair()[0], KB: pair()[1], "lora_te_x.lora_down.weight": torch.zeros(1, 1)}, str(p)
        ),
        "lora_te_x.lora_down.weight",
    ),
    "down given twice": (lambda p: two(p, *pair(), **{f"{AT}.lora_down.weight": pair()[0]}), None),
    "alpha in ai-toolkit": (lambda p: two(p, *pair(), **{f"{AT}.alpha": torch.tensor(4.0)}), f"{AT}.alpha"),
    # dtypes and shapes
    "float8 weights": (lambda p: two(p, pair()[0].to(torch.float8_e4m3fn), pair()[1]), A),
    "bool weights": (lambda p: two(p, pair()[0] > 0, pair()[1] > 0), A),
    "int64 weights": (lambda p: two(p, (pair()[0] * 10).long(), (pair()[1] * 10).long()), A),
    "rank 0": (lambda p: two(p, torch.zeros(0, D), torch.zeros(D, 0)), A),
    "scalar weight": (lambda p: two(p, torch.tensor(1.0), pair()[1]), A),
    "3-D weight": (lambda p: two(p, pair()[0][None], pair()[1]), A),
    "rank above min(in, out)": (lambda p: two(p, torch.zeros(D + 1, D), torch.zeros(D, D + 1)), A),
    "another model's width": (lambda p: two(p, torch.zeros(RANK, 3072), torch.zeros(D, RANK)), A),
    "ranks that differ": (lambda p: two(p, pair()[0], torch.zeros(D, RANK + 1)), A),
    "sparse 10 GiB up": (_sparse, A),
    # values
    "NaN weights": (lambda p: two(p, pair()[0], torch.full((D, RANK), float("nan"))), B),
    "infinite weights": (lambda p: two(p, pair()[0], torch.full((D, RANK), float("inf"))), B),
    "1e30 weights": (lambda p: two(p, pair()[0], pair(1e31)[1]), A),
    "1e4 weights": (lambda p: two(p, pair()[0], pair(1e5)[1]), A),
    "float64 beyond float32": (lambda p: two(p, pair()[0].double(), pair()[1].double() * 1e300), B),
    # alpha (kohya tensor, diffusers metadata)
    "alpha NaN": (lambda p: kohya(p, torch.tensor(float("nan"))), KALPHA),
    "alpha 1e38": (lambda p: kohya(p, torch.tensor(1e38)), KA),
    "alpha 0": (lambda p: kohya(p, torch.tensor(0.0)), KALPHA),
    "alpha negative": (lambda p: kohya(p, torch.tensor(-4.0)), KALPHA),
    "alpha a vector": (lambda p: kohya(p, torch.tensor([4.0, 4.0])), KALPHA),
    "alpha empty": (lambda p: kohya(p, torch.zeros(0)), KALPHA),
    "alpha boolean": (lambda p: kohya(p, torch.tensor(True)), KALPHA),
    "alpha float8": (lambda p: kohya(p, torch.tensor(4.0).to(torch.float8_e4m3fn)), KALPHA),
    "metadata alpha a string": (
        lambda p: diffusers(p, {"transformer.lora_alpha": "8"}),
        "__metadata__.lora_adapter_metadata",
    ),
    "metadata alpha a list": (
        lambda p: diffusers(p, {"transformer.lora_alpha": [8]}),
        "__metadata__.lora_adapter_metadata",
    ),
    "metadata alpha boolean": (
        lambda p: diffusers(p, {"transformer.lora_alpha": True}),
        "__metadata__.lora_adapter_metadata",
    ),
    "metadata alpha NaN": (
        lambda p: diffusers(p, '{"transformer.lora_alpha": NaN}'),
        "__metadata__.lora_adapter_metadata",
    ),
    "metadata not JSON": (lambda p: diffusers(p, "{not json"), "__metadata__.lora_adapter_metadata"),
    "metadata a list": (lambda p: diffusers(p, [8]), "__metadata__.lora_adapter_metadata"),
    "metadata 100k deep": (
        lambda p: diffusers(p, "[" * 100_000 + "]" * 100_000),
        "__metadata__.lora_adapter_metadata",
    ),
    # LoKr (BFL layout unless named): halves, shapes, values, names
    "LoKr w1 without w2": (lambda p: lokr(p, drop=(K2,)), K1),
    "LoKr w2_a without w2_b": (
        lambda p: lokr(p, drop=(K2B,), **{K2A.replace(".", "__"): torch.ones(8, 2)}),
        K2A,
    ),
    "LoKr w1 whole and decomposed": (
        lambda p: lokr(
            p, **{K1A.replace(".", "__"): torch.ones(8, 2), K1B.replace(".", "__"): torch.ones(2, 8)}
        ),
        K1,
    ),
    "LoKr w1 x w2 not the layer's shape": (
        lambda p: lokr(p, **{K2.replace(".", "__"): torch.ones(8, 9)}),
        K1,
    ),
    "LoKr factors of another model's width": (
        lambda p: lokr(
            p, **{K1.replace(".", "__"): torch.ones(8, 48), K2.replace(".", "__"): torch.ones(8, 64)}
        ),
        K1,
    ),
    "LoKr product far beyond the model, sparse": (_lokr_sparse, K1),
    "LoKr rank above its factor": (
        lambda p: lokr(
            p, **{K2A.replace(".", "__"): torch.ones(8, 9), K2B.replace(".", "__"): torch.ones(9, 8)}
        ),
        K2A,
    ),
    "LoKr ranks that differ": (
        lambda p: lokr(
            p, **{K2A.replace(".", "__"): torch.ones(8, 2), K2B.replace(".", "__"): torch.ones(3, 8)}
        ),
        K2A,
    ),
    "LoKr 3-D factor (a Tucker core)": (
        lambda p: lokr(p, **{K2.replace(".", "__"): torch.ones(8, 8, 1)}),
        K2,
    ),
    "LoKr Tucker key": (lambda p: lokr(p, **{f"{AT}__lokr_t2": torch.ones(2, 2, 1, 1)}), f"{AT}.lokr_t2"),
    "LoKr and LoRA keys in one file": (lambda p: lokr(p, **{A.replace(".", "__"): pair()[0]}), A),
    "LoKr float8 factor": (
        lambda p: lokr(p, **{K2.replace(".", "__"): torch.ones(8, 8).to(torch.float8_e4m3fn)}),
        K2,
    ),
    "LoKr NaN factor": (lambda p: lokr(p, **{K2.replace(".", "__"): torch.full((8, 8), float("nan"))}), K2),
    "LoKr infinite decomposed factor": (
        lambda p: lokr(
            p,
            **{
                K2A.replace(".", "__"): torch.ones(8, 2),
                K2B.replace(".", "__"): torch.full((2, 8), float("inf")),
            },
        ),
        K2B,
    ),
    "LoKr 1e30 factor": (lambda p: save_file(factors(1e31), str(p)), K1),
    "LoKr alpha 1e38 on a decomposition": (
        lambda p: save_file(factors(rank=2) | {KR_ALPHA: torch.tensor(1e38)}, str(p)),
        K1,
    ),
    "LoKr alpha NaN": (
        lambda p: save_file(factors(rank=2) | {KR_ALPHA: torch.tensor(float("nan"))}, str(p)),
        KR_ALPHA,
    ),
    "LoKr alpha a vector": (lambda p: save_file(factors() | {KR_ALPHA: torch.ones(2)}, str(p)), KR_ALPHA),
    "LoKr unknown layer": (
        lambda p: save_file({k.replace(".0.", ".7."): v for k, v in factors().items()}, str(p)),
        K1.replace(".0.", ".7."),
    ),
    "LyCORIS unknown sub-path": (
        lambda p: save_file({"lycoris_transformer_blocks_0_attn_norm_q.lokr_w1": torch.ones(8, 8)}, str(p)),
        "lycoris_transformer_blocks_0_attn_norm_q.lokr_w1",
    ),
    "LyCORIS block beyond the model": (
        lambda p: save_file(
            {f"lycoris_transformer_blocks_9_attn_to_out_0.lokr_w{k}": torch.ones(8, 8) for k in (1, 2)},
            str(p),
        ),
        "lycoris_transformer_blocks_9_attn_to_out_0.lokr_w1",
    ),
    "LyCORIS key without its prefix": (
        lambda p: save_file(
            {
                f"{LYCORIS}.lokr_w1": torch.ones(8, 8),
                f"{LYCORIS[len('lycoris_') :]}.lokr_w2": torch.ones(8, 8),
            },
            str(p),
        ),
        f"{LYCORIS[len('lycoris_') :]}.lokr_w2",
    ),
    "LoKr without a layout's prefix": (
        lambda p: save_file({"double_blocks.0.img_attn.proj.lokr_w1": torch.ones(8, 8)}, str(p)),
        "double_blocks.0.img_attn.proj.lokr_w1",
    ),
    "LoKr alpha in diffusers layout": (
        lambda p: save_file(
            {
                "transformer.transformer_blocks.0.attn.to_out.0.lokr_w1": torch.ones(8, 8),
                "transformer.transformer_blocks.0.attn.to_out.0.lokr_w2": torch.ones(8, 8),
                "transformer.transformer_blocks.0.attn.to_out.0.alpha": torch.tensor(4.0),
            },
            str(p),
        ),
        "transformer.transformer_blocks.0.attn.to_out.0.alpha",
    ),
}
