"""--offload-text-encoder's host residency: one host copy, device copies per visit, nothing copied back."""

from __future__ import annotations

import torch
from torch import nn

from klein_agent.pipeline import load_pipeline
from klein_agent.pipeline.offload import HostResident


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.register_buffer("offset", torch.ones(8))
        self.seen: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.linear.weight.device.type + "/" + self.offset.device.type)
        return self.linear(x) + self.offset


def test_a_call_runs_on_device_copies_and_never_copies_back() -> None:
    module = Probe()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    resident = HostResident(module)
    pointers = resident.host_pointers()
    assert set(pointers) == {"linear.weight", "linear.bias", "offset"}
    for _ in range(2):
        # meta stands in for the accelerator on a CPU machine: the call sees device copies of every tensor
        out = resident.run("meta", torch.ones(2, 8, device="meta"))
        assert out.device.type == "meta" and module.seen[-1] == "meta/meta"
        # the module still holds the very same host storages, values unchanged: nothing moved back or re-pinned
        assert resident.host_pointers() == pointers
        assert {n: t.untyped_storage().data_ptr() for n, t in module.state_dict().items()} == pointers
        assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    assert module.linear.weight.device.type == "cpu"


def test_the_offloaded_encoder_gives_the_resident_embedding() -> None:
    pipe = load_pipeline("tiny", device="cpu")
    resident, _ = pipe.encode_prompt("offload me")
    pipe.clear_caches()
    pipe._host_text = HostResident(pipe.text_embedder)  # what a GPU pipeline with offload holds
    offloaded, hit = pipe.encode_prompt("offload me")
    assert not hit and torch.equal(resident, offloaded)
