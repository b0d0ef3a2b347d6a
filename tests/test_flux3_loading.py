"""Loading FLUX 3 [klein] from what diffusers writes (a modular-pipeline folder) and from BFL's single-file layout,
strictly: every weight lands where diffusers' own loader puts it, and what does not fit is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers
from flux3_reference_checkpoints import Flux3Shape, load_flux3_reference, write_flux3_checkpoint
from PIL import Image
from safetensors.torch import save_file

from klein_agent.loading import flux3_keymaps
from klein_agent.loading.errors import CheckpointError
from klein_agent.loading.flux3_checkpoints import (
    is_flux3_folder,
    load_bfl_flux3_transformer,
    load_flux3_components,
)
from klein_agent.service.pngfile import PROVENANCE_KEY

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flux3_checkpoint(tmp_path_factory.mktemp("flux3") / "klein")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flux3_checkpoint(
        tmp_path_factory.mktemp("flux3") / "base", Flux3Shape(distilled=False), seed=1
    )


def _ours_as_diffusers(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return flux3_keymaps.transformer_to_diffusers(transformer.state_dict())


@pytest.mark.parametrize("kind", ["distilled", "base"])
def test_a_diffusers_folder_loads_every_weight_where_diffusers_puts_it(
    kind: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(kind)
    assert is_flux3_folder(folder)
    ours = load_flux3_components(folder, CPU, torch.float32)
    ref = load_flux3_reference(folder, distilled=kind == "distilled")
    theirs = ref.transformer.state_dict()
    mine = _ours_as_diffusers(ours.transformer)
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    text = ref.text_encoder.model.language_model.state_dict()
    got_text = ours.text_embedder.model.state_dict()
    for key, value in got_text.items():
        if not key.startswith("rotary_emb."):
            assert torch.equal(value, text[key]), key
    assert ours.sampling.distilled == (kind == "distilled")
    assert ours.sampling.steps == (16 if kind == "distilled" else 50)
    assert ours.variant == ("flux3-custom")  # the fixture's shape is not a preset's
    assert ours.scheduler.shift == pytest.approx(6.93) and not ours.scheduler.use_dynamic_shifting


def test_a_moved_folder_loads_from_where_it_is(distilled: Path, tmp_path: Path) -> None:
    """diffusers writes the absolute path it saved to into the index; the copy must not read the original."""
    moved = tmp_path / "moved"
    shutil.copytree(distilled, moved)
    index = json.loads((moved / "modular_model_index.json").read_text())
    assert index["transformer"][2]["pretrained_model_name_or_path"] == str(
        distilled
    )  # what makes this a test
    original = tmp_path / "gone"
    index["transformer"][2]["pretrained_model_name_or_path"] = str(original)
    index["vae"][2]["pretrained_model_name_or_path"] = str(original)
    (moved / "modular_model_index.json").write_text(json.dumps(index))
    loaded = load_flux3_components(moved, CPU, torch.float32)
    assert loaded.transformer.config.flow_map


def test_a_missing_component_folder_is_named(distilled: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(distilled, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=r"lacks the vae folder vae/"):
        load_flux3_components(broken, CPU, torch.float32)


def test_an_index_of_the_other_variant_is_refused(distilled: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(distilled, mixed)
    index = json.loads((mixed / "modular_model_index.json").read_text())
    index["_class_name"] = "Flux3ModularPipeline"
    (mixed / "modular_model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"names Flux3ModularPipeline, but its transformer is a flow map"
    ):
        load_flux3_components(mixed, CPU, torch.float32)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bare", "comfy-prefix"])
def test_a_bfl_single_file_loads_with_and_without_the_prefix(
    distilled: Path, tmp_path: Path, prefix: str
) -> None:
    folder_model = load_flux3_components(distilled, CPU, torch.float32).transformer
    bfl = dict(folder_model.state_dict())
    # diffusers' own converter reads these names back to its layout: our names are BFL's
    converted = convert_flux3_transformer_checkpoint_to_diffusers(dict(bfl))
    theirs = load_flux3_reference(distilled, distilled=True).transformer.state_dict()
    assert set(converted) == set(theirs) and all(torch.equal(converted[k], theirs[k]) for k in theirs)
    bfl["repa_projectors.0.weight"] = torch.zeros(2, 2)  # training-only, dropped as diffusers drops it
    path = tmp_path / "flux-3-klein.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()}, str(path))
    loaded = load_bfl_flux3_transformer(path, CPU, torch.float32)
    assert loaded.config == folder_model.config
    assert all(torch.equal(v, folder_model.state_dict()[k]) for k, v in loaded.state_dict().items())
    # and as the transformer of the folder
    assert load_flux3_components(
        distilled, CPU, torch.float32, transformer_file=path
    ).transformer.config.flow_map


def test_a_bfl_file_that_does_not_fit_names_the_keys(distilled: Path, tmp_path: Path) -> None:
    state = dict(load_flux3_components(distilled, CPU, torch.float32).transformer.state_dict())
    del state["txt_mode_blocks.1.mlp_in.weight"]
    state["single_blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as caught:
        load_bfl_flux3_transformer(path, CPU, torch.float32)
    message = str(caught.value)
    assert str(path) in message
    assert "1 missing keys: txt_mode_blocks.1.mlp_in.weight" in message
    assert "1 unexpected keys: single_blocks.0.extra.weight" in message


def test_a_flux2_file_is_not_taken_for_flux3(tmp_path: Path) -> None:
    path = tmp_path / "flux2.safetensors"
    save_file({"img_in.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(
        CheckpointError, match=r"is not a FLUX 3 transformer: it has no 'emb_in.image.weight'"
    ):
        load_bfl_flux3_transformer(path, CPU, torch.float32)


def test_generate_on_a_flux3_folder_runs_it(distilled: Path, tmp_path: Path) -> None:
    """Before: "has no model_index.json; pass the folder of a diffusers-layout model", which sent users looking for
    a file FLUX 3 never has; then "not behind generate yet". Now generate runs the folder as a FLUX 3 model (its
    pixels are checked against diffusers in test_flux3_serving.py)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "klein_agent", "generate", "--model", str(distilled), "--prompt", "x"]
    out = tmp_path / "o.png"
    done = subprocess.run(
        [*argv, "--steps", "1", "--width", "64", "--height", "64", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "model_index.json" not in done.stderr
    assert done.stdout == ""  # stdout is the MCP wire for serve: generate keeps it clean too
    with Image.open(out) as picture:
        assert picture.size == (64, 64)
        assert json.loads(picture.text[PROVENANCE_KEY])["model"] == str(distilled)  # type: ignore[attr-defined]
