"""tools/bench.py --flux3 runs ours and diffusers' modular pipeline on the same weights and embeddings, and reports
each row's medians, the same-run ratio and how far our picture is from the reference's (the bench is only fair if
both sides make the same picture)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import bench  # tools/ is on sys.path (conftest)
import pytest
import torch
from test_pipeline_parity import MIN_PSNR_DB


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # bench.main(--threads N) sets the process's count
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "steps"), [("flux3-tiny", []), ("flux3-tiny-base", ["--steps", "4"])])
def test_flux3_rows_compare_the_same_pictures(preset: str, steps: list[str], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--flux3", "--preset", preset, "--sizes", "64x48", "--refs", "0", "1", "2", "--ref-size", "96x64"]
    assert (
        bench.main([*argv, *steps, "--runs", "2", "--warmup", "1", "--threads", "1", "--json", str(out)]) == 0
    )
    data = json.loads(out.read_text())
    assert preset in data["header"] and "interleaved" in data["header"]
    rows = data["flux3_results"]
    assert [(r["size"], r["references"]) for r in rows] == [("64x48", 0), ("64x48", 1), ("64x48", 2)]
    for row in rows:
        assert row["ms"]["ours"] > 0 and row["ms"]["reference"] > 0 and row["text_ms"] > 0
        assert row["ratio"] == pytest.approx(row["ms"]["reference"] / row["ms"]["ours"])
        assert row["cpu_ratio"] == pytest.approx(row["cpu_ms"]["reference"] / row["cpu_ms"]["ours"])
        assert row["psnr_vs_reference_db"] >= MIN_PSNR_DB, row


def test_a_flux2_preset_is_refused() -> None:
    with pytest.raises(SystemExit, match="--flux3 needs a FLUX 3 preset"):
        bench.main(["--flux3", "--preset", "tiny", "--no-reference"])
