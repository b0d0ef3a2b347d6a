"""Low-rank adapters (LoRA) on the transformer's linear layers, applied without touching the base weights.

`LoRALinear` wraps one `nn.Linear`: y = W x + sum over active adapters of scale * B (A x), the unfused path PEFT
runs (peft `tuners/lora/layer.py` Linear.forward), so switching adapters per call costs nothing and the base
weights stay exact. No file I/O here: `klein_agent.loading.lora` reads files into `Adapter`s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LowRank:
    """One layer's update: delta W = up @ down, the file's alpha / rank already folded into `up`."""

    down: Tensor  # [rank, in_features] (lora_A / lora_down)
    up: Tensor  # [out_features, rank] (lora_B / lora_up)


class LoRALinear(nn.Module):
    """A linear layer with named low-rank updates, of which `active` ((name, scale) pairs) are applied."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.adapters: dict[str, LowRank] = {}
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
                y = y + nn.functional.linear(nn.functional.linear(x, update.down), update.up) * scale
        return y


def attach(model: nn.Module, name: str, updates: Mapping[str, LowRank]) -> None:
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
        layer.adapters[name] = LowRank(
            update.down.to(weight.device, weight.dtype), update.up.to(weight.device, weight.dtype)
        )


def activate(model: nn.Module, adapters: Sequence[tuple[str, float]]) -> None:
    """Make `adapters` ((name, scale) pairs, applied in this order) the active set on every wrapped layer."""
    active = tuple((name, float(scale)) for name, scale in adapters)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.active = active


@torch.no_grad()
def merge(model: nn.Module, adapters: Sequence[tuple[str, float]], sign: float = 1.0) -> None:
    """Add (sign 1) or subtract (sign -1) scale * up @ down into the base weights of every layer an adapter
    touches, in float32 then rounded to the weight's dtype (the merged path; benchmarks compare it with the
    unfused one). Subtracting is exact only in float32."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for name, scale in adapters:
                update = module.adapters.get(name)
                if update is not None:
                    w = module.base.weight
                    delta = (update.up.float() @ update.down.float()) * (scale * sign)
                    w.copy_((w.float() + delta).to(w.dtype))
