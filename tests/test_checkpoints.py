"""Checkpoint layouts, the key maps, and clear errors for checkpoints that do not fit."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from klein_agent.loading import keymaps
from klein_agent.loading.checkpoints import (
    CheckpointError,
    infer_transformer_config,
    load_components,
)
from klein_agent.loading.hub import download_command, resolve_model_path
from klein_agent.loading.random_init import build_tiny
from klein_agent.model.configs import preset
from klein_agent.pipeline import load_pipeline
from klein_agent.rules.requests import GenerationRequest

CPU = torch.device("cpu")
REQUEST = GenerationRequest("a red cube", width=48, height=32, seed=4)


@pytest.fixture
def checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def test_both_layouts_give_the_same_picture(tiny_checkpoint: Path) -> None:
    folder = load_pipeline(str(tiny_checkpoint)).generate(REQUEST).images[0].tobytes()
    single = (
        load_pipeline(
            str(tiny_checkpoint), transformer_file=str(tiny_checkpoint / "flux-2-klein.safetensors")
        )
        .generate(REQUEST)
        .images[0]
        .tobytes()
    )
    assert folder == single


def test_sharded_transformer_is_read_through_its_index(tiny_checkpoint: Path) -> None:
    shards = sorted((tiny_checkpoint / "transformer").glob("*-of-00002.safetensors"))
    assert (
        len(shards) == 2
        and (tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    )
    components = load_components(tiny_checkpoint, CPU, torch.float32)
    assert components.transformer.config == preset("tiny").transformer
    assert components.autoencoder.config == preset("tiny").autoencoder
    assert components.variant == "tiny" and components.sampling.distilled  # matched to its preset


def test_sizes_come_from_the_checkpoint_not_a_preset(tiny_checkpoint: Path) -> None:
    state = load_file(str(tiny_checkpoint / "flux-2-klein.safetensors"))
    assert infer_transformer_config(state, "x") == preset("tiny").transformer


def test_transformer_key_map_round_trip() -> None:
    transformer, _, _ = build_tiny()
    ours = transformer.state_dict()
    theirs = keymaps.transformer_to_diffusers(ours)
    assert (
        "transformer_blocks.0.attn.to_q.weight" in theirs
        and "double_blocks.0.img_attn.qkv.weight" not in theirs
    )
    back = keymaps.transformer_from_diffusers(theirs)
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # the final modulation halves really are swapped, not copied
    d = transformer.config.hidden_size
    assert torch.equal(
        theirs["norm_out.linear.weight"][:d], ours["final_layer.adaLN_modulation.1.weight"][d:]
    )


def test_autoencoder_key_map_round_trip() -> None:
    _, autoencoder, _ = build_tiny()
    ours = autoencoder.state_dict()
    theirs = keymaps.autoencoder_to_diffusers(ours)
    assert "decoder.up_blocks.0.resnets.0.conv1.weight" in theirs
    assert theirs["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    # diffusers' decoder level 0 is BFL's deepest level
    last = len(autoencoder.config.block_out_channels) - 1
    assert torch.equal(
        theirs["decoder.up_blocks.0.resnets.0.conv1.weight"], ours[f"decoder.up.{last}.block.0.conv1.weight"]
    )
    back = keymaps.autoencoder_from_diffusers(theirs)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_comfyui_prefixed_single_file_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_checkpoint / "flux-2-klein.safetensors"))
    prefixed = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(prefixed))
    got = load_pipeline(str(tiny_checkpoint), transformer_file=str(prefixed)).generate(REQUEST).images[0]
    assert got.tobytes() == load_pipeline("tiny").generate(REQUEST).images[0].tobytes()


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_key_is_named(checkpoint_copy: Path) -> None:
    file = checkpoint_copy / "flux-2-klein.safetensors"
    _rewrite(file, lambda s: s.pop("single_blocks.1.linear2.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: single_blocks\.1\.linear2\.weight"):
        load_components(checkpoint_copy, CPU, torch.float32, transformer_file=file)


def test_unexpected_key_is_named(checkpoint_copy: Path) -> None:
    file = checkpoint_copy / "vae" / "diffusion_pytorch_model.safetensors"
    _rewrite(file, lambda s: s.update({"encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: encoder\.extra\.weight"):
        load_components(checkpoint_copy, CPU, torch.float32)


def test_wrong_shape_is_named(checkpoint_copy: Path) -> None:
    file = checkpoint_copy / "flux-2-klein.safetensors"
    _rewrite(file, lambda s: s.update({"final_layer.linear.weight": torch.zeros(3, 64)}))
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped tensors: final_layer\.linear\.weight \(3, 64\) \(expected \(16, 64\)\)",
    ):
        load_components(checkpoint_copy, CPU, torch.float32, transformer_file=file)


def test_wrong_dtype_is_named(checkpoint_copy: Path) -> None:
    file = checkpoint_copy / "flux-2-klein.safetensors"
    _rewrite(file, lambda s: s.update({"img_in.weight": s["img_in.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"non-floating-point weights: img_in\.weight \(torch\.int32\)"):
        load_components(checkpoint_copy, CPU, torch.float32, transformer_file=file)


def test_missing_component_folder_is_named(checkpoint_copy: Path) -> None:
    shutil.rmtree(checkpoint_copy / "vae")
    with pytest.raises(CheckpointError, match=r"lacks the folder.*vae"):
        load_components(checkpoint_copy, CPU, torch.float32)


def test_missing_index_and_shard_are_named(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"00002-of-00002.safetensors listed in .* are missing"):
        load_components(checkpoint_copy, CPU, torch.float32)
    (checkpoint_copy / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match=r"model_index.json is missing"):
        load_components(checkpoint_copy, CPU, torch.float32)


def test_config_disagreeing_with_the_weights_is_caught(checkpoint_copy: Path) -> None:
    config = json.loads((checkpoint_copy / "transformer" / "config.json").read_text())
    config["joint_attention_dim"] = 64
    (checkpoint_copy / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mis-shaped"):
        load_components(checkpoint_copy, CPU, torch.float32)


def test_repo_id_resolves_from_the_hugging_face_cache(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache.*--allow-download"):
        resolve_model_path("black-forest-labs/FLUX.2-klein-4B")
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.2-klein-4B"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_model_path("black-forest-labs/FLUX.2-klein-4B") == repo / "snapshots" / "abc123"
    picture = load_pipeline("black-forest-labs/FLUX.2-klein-4B").generate(REQUEST).images[0]
    assert picture.tobytes() == load_pipeline("tiny").generate(REQUEST).images[0].tobytes()


def test_not_a_model_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match="--model /no/such/folder: there is no folder /no/such/folder"):
        resolve_model_path("/no/such/folder")
    with pytest.raises(CheckpointError, match="'nosuch' is neither a folder here nor a Hugging Face repo id"):
        resolve_model_path("nosuch")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=f"the folder {tmp_path}/? has no model_index.json"):
        resolve_model_path("./")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"is a file, not a model folder.*--transformer-file"):
        resolve_model_path("weights.safetensors")


def test_a_failed_download_names_the_repo_and_the_way_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx2  # what huggingface_hub 2.x raises through
    import huggingface_hub

    def offline(repo_id: str) -> str:
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as caught:
        resolve_model_path("owner/some-model", allow_download=True)
    message = str(caught.value)
    assert message.startswith("could not download owner/some-model (ConnectError: [Errno -3]")
    assert f"`{download_command('owner/some-model')}`" in message
    assert str(tmp_path / "hub") in message and "--model" in message


def _cached_repo(tiny_checkpoint: Path, hub: Path, repo_id: str) -> Path:
    """The checkpoint laid out as huggingface_hub caches it: snapshot files are links into blobs/."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "abc123"
    for file in sorted(tiny_checkpoint.rglob("*")):
        if file.is_file():
            blob = repo / "blobs" / f"{abs(hash(str(file)))}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, blob)
            link = snapshot / file.relative_to(tiny_checkpoint)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    return snapshot


def test_an_interrupted_download_names_the_missing_shard_and_the_command_to_finish_it(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo_id = "black-forest-labs/FLUX.2-klein-4B"
    snapshot = _cached_repo(tiny_checkpoint, tmp_path / "hub", repo_id)
    # shard 1 of 2 arrived, the index and shard 2 did not
    (snapshot / "transformer" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    (snapshot / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as caught:
        load_pipeline(repo_id)
    message = str(caught.value)
    assert message.startswith("incomplete download:")
    assert "diffusion_pytorch_model-00002-of-00002.safetensors missing" in message
    assert f"run `hf download {repo_id}` again" in message
    assert "missing keys" not in message


def test_a_link_to_a_missing_blob_is_an_incomplete_download(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo_id = "black-forest-labs/FLUX.2-klein-4B"
    snapshot = _cached_repo(tiny_checkpoint, tmp_path / "hub", repo_id)
    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").resolve().unlink()
    with pytest.raises(
        CheckpointError, match=r"incomplete download: .*vae.*link\(s\) to a file that is missing"
    ):
        load_pipeline(repo_id)


def test_the_download_command_is_one_the_installed_huggingface_hub_ships() -> None:
    from importlib.metadata import entry_points

    program = download_command("owner/name").split()[0]
    scripts = {
        ep.name
        for ep in entry_points(group="console_scripts")
        if ep.dist and ep.dist.name == "huggingface_hub"
    }
    assert program in scripts, f"{program} is not a console script of huggingface_hub ({sorted(scripts)})"
    # the docs give the very command the error messages give
    repo_root = Path(__file__).resolve().parents[1]
    named = []
    for doc in [repo_root / "README.md", *sorted((repo_root / "docs").glob("*.md"))]:
        for command, repo_id in re.findall(
            r"`([\w.-]+(?: [\w.-]+)?) download ([\w.-]+/[\w.-]+)", doc.read_text()
        ):
            named.append(f"{command} download {repo_id}")
            assert f"{command} download {repo_id}" == download_command(repo_id), doc.name
    assert named, "the README tells users how to download a model"


def test_variants_are_recognised_by_matching_presets() -> None:
    from klein_agent.loading.checkpoints import detect_variant
    from klein_agent.model.configs import BASE_SAMPLING, DISTILLED_SAMPLING

    assert detect_variant(preset("klein-4b").transformer, DISTILLED_SAMPLING) == "klein-4b"
    assert detect_variant(preset("klein-9b").transformer, BASE_SAMPLING) == "klein-base-9b"
    assert detect_variant(preset("tiny").transformer, BASE_SAMPLING) == "tiny-base"
    odd = dataclasses.replace(preset("klein-9b").transformer, depth=7)
    assert detect_variant(odd, DISTILLED_SAMPLING) == "custom"


def test_a_scheduler_that_changes_the_sampler_is_refused(checkpoint_copy: Path) -> None:
    path = checkpoint_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_karras_sigmas": True}))
    with pytest.raises(CheckpointError, match=r"use_karras_sigmas.*flow-matching Euler schedule only"):
        load_components(checkpoint_copy, CPU, torch.float32)
