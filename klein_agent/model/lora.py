"""Adapters (LoRA, LoKr) on the transformer's linear layers, applied without touching the base weights.

`LoRALinear` wraps one `nn.Linear`: y = W x + sum over active adapters of scale * delta(x), the unfused path PEFT
runs (peft `tuners/lora/layer.py`, `tuners/lokr/layer.py` Linear.forward), so switching adapters per call costs
nothing and the base weights stay exact. A layer's update is a `LowRank` (LoRA: delta W = B A) or a `Kronecker`
(LoKr: delta W = w1 ⊗ w2, or products of such on parts of a fused layer). No file I/O here:
`klein_agent.loading.lora` and `klein_agent.loading.lokr` read files into them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LowRank:
    """One layer's update: delta W = up @ down, the file's alpha / rank already folded into `up`."""

    down: Tensor  # [rank, in_features] (lora_A / lora_down)
    up: Tensor  # [out_features, rank] (lora_B / lora_up)

    def to(self, device: torch.device, dtype: torch.dtype) -> LowRank:
        """The same update on `device` in `dtype`."""
        return LowRank(self.down.to(device, dtype), self.up.to(device, dtype))

    def delta(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        """B (A x): never the [out, in] matrix."""
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up)

    def matrix(self) -> Tensor:
        """delta W [out, in] in float32 (for merging)."""
        return self.up.float() @ self.down.float()


Chain: TypeAlias = tuple[Tensor, ...]  # matrices whose product is one Kronecker factor: (w,) or (w_a, w_b)


def _chain_matrix(chain: Chain) -> Tensor:
    result = chain[0].float()
    for m in chain[1:]:
        result = result @ m.float()
    return result


@dataclass(frozen=True)
class KroneckerPiece:
    """delta W[start : start + a*b] = w1 ⊗ w2 for w1 [a, c] and w2 [b, d] with c*d = in_features; each factor kept
    as its file has it, a full matrix or two whose product it is (LyCORIS' rank-decomposed `_a`/`_b`), the file's
    alpha / rank already folded into w1."""

    start: int  # first output row of the layer it fills
    w1: Chain  # [a, c], or [a, r] and [r, c]
    w2: Chain  # [b, d], or [b, r] and [r, d]

    @property
    def rows(self) -> int:
        """a*b, the output rows it fills."""
        return self.w1[0].shape[0] * self.w2[0].shape[0]

    def delta(self, x: Tensor) -> Tensor:  # [..., c*d] -> [..., a*b]
        """(w1 ⊗ w2) x without the product: with x viewed as X [c, d], (w1 ⊗ w2) vec(X) = vec(w1 X w2ᵀ) (row-major
        vec), so a token costs c*d*b + c*b*a multiply-adds (less through a decomposed factor) instead of a*b*c*d."""
        c, d = self.w1[-1].shape[1], self.w2[-1].shape[1]
        z = x.reshape(*x.shape[:-1], c, d)
        for m in reversed(self.w2):  # X w2ᵀ = X w_bᵀ w_aᵀ
            z = z @ m.T
        for m in reversed(self.w1):  # w1 Z = w_a (w_b Z)
            z = m @ z
        return z.reshape(*x.shape[:-1], -1)

    def matrix(self) -> Tensor:
        """w1 ⊗ w2 [a*b, c*d] in float32 (for merging)."""
        return torch.kron(_chain_matrix(self.w1), _chain_matrix(self.w2))


@dataclass(frozen=True)
class Kronecker:
    """One layer's LoKr update: Kronecker products filling disjoint row ranges of the layer (a whole layer, or the
    q, k and v thirds of a fused projection, each its own product). `roll` moves the assembled rows by that many
    (diffusers' final modulation is [scale; shift], BFL's [shift; scale]: a half turn)."""

    pieces: tuple[KroneckerPiece, ...]  # sorted by start, not overlapping
    out_features: int
    roll: int = 0

    def to(self, device: torch.device, dtype: torch.dtype) -> Kronecker:
        """The same update on `device` in `dtype`."""
        moved = tuple(
            KroneckerPiece(
                p.start, tuple(m.to(device, dtype) for m in p.w1), tuple(m.to(device, dtype) for m in p.w2)
            )
            for p in self.pieces
        )
        return Kronecker(moved, self.out_features, self.roll)

    def delta(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        """The pieces' outputs in their rows, zeros between them."""
        parts, at = [], 0
        for piece in self.pieces:
            if piece.start > at:
                parts.append(x.new_zeros(*x.shape[:-1], piece.start - at))
            parts.append(piece.delta(x))
            at = piece.start + piece.rows
        if at < self.out_features:
            parts.append(x.new_zeros(*x.shape[:-1], self.out_features - at))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return torch.roll(y, self.roll, dims=-1) if self.roll else y

    def matrix(self) -> Tensor:
        """delta W [out, in] in float32 (for merging)."""
        in_features = self.pieces[0].w1[-1].shape[1] * self.pieces[0].w2[-1].shape[1]
        w = torch.zeros(self.out_features, in_features, device=self.pieces[0].w1[0].device)
        for piece in self.pieces:
            w[piece.start : piece.start + piece.rows] = piece.matrix()
        return torch.roll(w, self.roll, dims=0) if self.roll else w


Update: TypeAlias = LowRank | Kronecker


class LoRALinear(nn.Module):
    """A linear layer with named low-rank updates, of which `active` ((name, scale) pairs) are applied."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.adapters: dict[str, Update] = {}
        self.active: tuple[tuple[str, float], ...] = ()

    @property
    def weight(self) -> Tensor:
        """The base weight (FP8 and compile code read it as they would from the plain layer)."""
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        """The base layer's output plus each active update, in x's dtype."""
        y = self.base(x)
        for name, scale in self.active:
            update = self.adapters.get(name)
            if update is not None:
                y = y + update.delta(x) * scale
        return y


def attach(model: nn.Module, name: str, updates: Mapping[str, Update]) -> None:
    """Add adapter `name` to `model`: each key of `updates` names a linear layer (BFL names, without `.weight`);
    layers are wrapped in `LoRALinear` the first time. The updates move to the layer's device and dtype."""
    for layer_name, update in updates.items():
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = model.get_submodule(layer_name)
        if not isinstance(layer, LoRALinear):
            assert isinstance(layer, nn.Linear), layer_name
            layer = LoRALinear(layer)
            setattr(parent, child, layer)  # also for Sequential children: their names are "0", "1", ...
        weight = layer.base.weight
        layer.adapters[name] = update.to(weight.device, weight.dtype)


def activate(model: nn.Module, adapters: Sequence[tuple[str, float]]) -> None:
    """Make `adapters` ((name, scale) pairs, applied in this order) the active set on every wrapped layer."""
    active = tuple((name, float(scale)) for name, scale in adapters)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.active = active


@torch.no_grad()
def merge(model: nn.Module, adapters: Sequence[tuple[str, float]], sign: float = 1.0) -> None:
    """Add (sign 1) or subtract (sign -1) scale * delta W into the base weights of every layer an adapter
    touches, in float32 then rounded to the weight's dtype (the merged path; benchmarks compare it with the
    unfused one). Subtracting is exact only in float32."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for name, scale in adapters:
                update = module.adapters.get(name)
                if update is not None:
                    w = module.base.weight
                    delta = update.matrix().to(w.device) * (scale * sign)
                    w.copy_((w.float() + delta).to(w.dtype))
