"""A module that lives in host memory and visits the accelerator: one pinned host copy, never copied back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call


class HostResident:
    """Keeps `module`'s parameters and buffers as ONE page-locked host copy (pinned where CUDA is available).

    `run(device, *args)` calls the module on device copies made for that call (asynchronous host-to-device copies
    from pinned memory), dropped when it returns: nothing is copied back to the host and nothing is re-pinned, so
    a new prompt costs one host-to-device transfer, not two plus a re-pin. The module's tensors keep the host
    storages throughout (tests/test_offload.py checks their pointers).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        module.to("cpu")
        pin = torch.cuda.is_available()
        self._host: dict[str, Tensor] = {}
        for name, tensor in _tensors(module):
            host = tensor.data.pin_memory() if pin else tensor.data
            tensor.data = host
            self._host[name] = host

    def run(self, device: torch.device | str, *args: Any) -> Any:
        """`module(*args)` with its tensors copied to `device` for this call only (torch.func.functional_call):
        the module itself keeps pointing at the host copies throughout, so there is nothing to copy back."""
        on_device = {name: host.to(device, non_blocking=True) for name, host in self._host.items()}
        return functional_call(self.module, on_device, args)


def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters()
    for name, buffer in module.named_buffers():
        if buffer is not None:
            yield name, buffer
