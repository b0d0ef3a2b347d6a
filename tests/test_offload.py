"""--offload-text-encoder's host residency: one host copy, device copies per visit, nothing copied back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from klein_agent.loading import checkpoints
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
    pointers = {n: t.untyped_storage().data_ptr() for n, t in module.state_dict().items()}
    assert set(pointers) == {"linear.weight", "linear.bias", "offset"}
    for _ in range(2):
        # meta stands in for the accelerator on a CPU machine: the call sees device copies of every tensor
        out = resident.run("meta", torch.ones(2, 8, device="meta"))
        assert out.device.type == "meta" and module.seen[-1] == "meta/meta"
        # the module still holds the very same host storages, values unchanged: nothing moved back or re-pinned
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


def test_offload_reads_the_encoder_straight_into_host_memory(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The meta device stands in for the GPU: nothing on it can come back (it holds no values), so a text encoder
    that matches the host-loaded one value for value never went there. Every read is spied on as well."""
    real_read = checkpoints.read_safetensors
    reads: list[tuple[str, str]] = []

    def spy(files: Any, device: torch.device, keep: Any = None) -> dict[str, torch.Tensor]:
        files = list(files)
        reads.append((files[0].parent.name, torch.device(device).type))
        out = real_read(files, torch.device("cpu"), keep)  # safetensors cannot read onto meta; move after
        return {k: v.to(device) for k, v in out.items()}

    monkeypatch.setattr(checkpoints, "read_safetensors", spy)
    compute = torch.device("meta")
    parts = checkpoints.load_components(
        tiny_checkpoint, compute, torch.float32, text_encoder_device=torch.device("cpu")
    )
    assert ("text_encoder", "cpu") in reads and ("text_encoder", "meta") not in reads
    assert ("transformer", "meta") in reads  # the rest did go to the compute device
    assert {t.device.type for t in parts.transformer.state_dict().values()} == {"meta"}
    text = parts.text_embedder.state_dict()
    assert {t.device.type for t in text.values()} == {"cpu"}
    monkeypatch.setattr(checkpoints, "read_safetensors", real_read)
    host = checkpoints.load_components(tiny_checkpoint, torch.device("cpu"), torch.float32).text_embedder
    assert all(torch.equal(v, text[k]) for k, v in host.state_dict().items())


def test_load_pipeline_offloads_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_pipeline with --offload-text-encoder on a "GPU" (meta again): the encoder stays on the host."""
    import klein_agent.pipeline.build as build

    monkeypatch.setattr(build, "resolve_device", lambda name: torch.device("meta"))
    pipe = load_pipeline("tiny", offload_text_encoder=True, dtype="float32")
    assert pipe.device.type == "meta" and pipe._host_text is not None
    assert {t.device.type for t in pipe.text_embedder.state_dict().values()} == {"cpu"}
