"""Where the model runs and in which precision: CUDA in bfloat16 by default, otherwise float32."""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str | None) -> torch.device:
    """The device `name` names, else the best available (CUDA, then MPS, then the CPU).

    Raises ValueError when `name` asks for CUDA or MPS and this machine's torch cannot use it.
    """
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: this torch build sees no CUDA device ({_cuda_build()}); use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _cuda_build() -> str:
    """Why CUDA may be missing, in a few words: a CPU-only build of torch, or a CUDA build that finds no GPU."""
    if torch.version.cuda is None:
        return "a CPU-only build of torch"
    return f"built for CUDA {torch.version.cuda}, but no GPU or driver is found"


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype `name` names, else bfloat16 on CUDA and float32 elsewhere; ValueError for an unknown name."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


# klein 9B keeps 2 x 32 blocks x 4096 channels per reference token: 2 GiB in bfloat16 for a 1024x1024 reference
CPU_REFERENCE_KV_CACHE_BYTES = 2 * 1024**3


def default_reference_kv_cache_bytes(device: torch.device) -> int:
    """How many bytes of reference keys and values (klein 9B-KV) a pipeline on `device` keeps across calls.

    CUDA: half the memory free once the model is loaded, at most a quarter of the card (an H200 keeps about
    eight 1024x1024 9B references, a card with little left keeps none rather than run out of memory).
    Elsewhere (CPU, MPS): 2 GiB.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(min(free // 2, total // 4))
    return CPU_REFERENCE_KV_CACHE_BYTES
