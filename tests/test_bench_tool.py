"""tools/bench.py runs on CPU and reports every stage, the reference and the ratio (its GPU use is the same code)."""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bench  # tools/ is on sys.path (conftest)
import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    # bench.main(--threads N) sets the process's torch thread count; later tests in this process compare pixels
    # with a subprocess running the default count, and a different count changes float reductions
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_bench_reports_stages_and_the_reference_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--preset",
        "tiny",
        "--sizes",
        "64x48",
        "--refs",
        "0",
        "1",
        "--ref-size",
        "96x64",
        "--threads",
        "1",
    ]
    assert bench.main([*argv, "--runs", "2", "--warmup", "1", "--fp8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "fp8" in data["header"] and "float32" in data["header"] and "1 threads" in data["header"]
    rows = data["results"]
    assert [(r["size"], r["references"]) for r in rows] == [("64x48", 0), ("64x48", 1)]
    for row in rows:
        for clock in ("ours", "ours_cpu"):
            stages = row[clock]
            assert {
                "text",
                "references",
                "step 1",
                "step 4",
                "decode",
                "end to end",
                "retry (cached)",
            } <= set(stages)
            assert all(v >= 0 for v in stages.values())
        assert row["reference_ms"] > 0 and row["reference_cpu_ms"] > 0
        assert row["ratio"] == pytest.approx(row["reference_ms"] / row["ours"]["end to end"])
        assert row["peak_memory_bytes"] > 0
        assert row["fp8_psnr_db"] is not None and row["fp8_psnr_db"] > 0
    assert rows[1]["ours"]["references"] > 0  # a reference was really encoded


def test_bench_adapters_reports_lora_and_inpaint_costs(tmp_path: Path) -> None:
    import bench_adapters

    out = tmp_path / "adapters.json"
    argv = [
        "--preset",
        "tiny",
        "--size",
        "64x64",
        "--rank",
        "2",
        "--steps",
        "2",
        "--runs",
        "1",
        "--json",
        str(out),
    ]
    assert bench_adapters.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert {"step, no adapter", "step, one unfused adapter", "step, merged adapter"} <= set(results)
    assert {"step, one unfused LoKr adapter", "load, LoRA file (read, check, attach)"} <= set(results)
    assert "load, LoKr file (read, check, attach)" in results
    assert any(k.startswith("inpaint 64x64") for k in results) and all(v > 0 for v in results.values())


@pytest.mark.slow
def test_fp8_gate_fails_the_run_under_its_threshold() -> None:
    argv = ["--preset", "tiny", "--sizes", "32x32", "--runs", "1", "--warmup", "0", "--no-reference", "--fp8"]
    assert bench.main([*argv, "--fp8-min-psnr", "1000"]) == 3


def test_runs_interleave_and_alternate_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(bench, "run_ours", lambda *a: calls.append("ours"))
    monkeypatch.setattr(bench, "run_reference", lambda *a: calls.append("ref"))

    class NoMemory:
        def reset(self) -> None: ...

        def read(self) -> int:
            return 0

    request = bench.GenerationRequest("p", 32, 32, seed=1)
    row: Any = bench.measure_row(
        object(),
        object(),
        request,
        runs=3,
        warmup=1,
        memory=NoMemory(),
        held_by_reference=0,  # type: ignore[arg-type]
    )
    assert calls == ["ours", "ref", "ref", "ours", "ours", "ref", "ref", "ours"]
    assert row.size == "32x32"


def test_peak_memory_excludes_what_only_the_reference_holds() -> None:
    pytest.importorskip("diffusers")
    from reference_pipeline import reference_pipeline

    pipe = bench.build_pipeline(bench.parse_args(["--preset", "tiny"]), torch.device("cpu"), torch.float32)
    reference = reference_pipeline(pipe)
    held = bench.reference_only_bytes(reference, pipe, torch.device("cpu"))
    # the reference's extra encoder layers (copies of our last one) and its own small tensors, nothing shared
    layer = sum(
        p.numel() * p.element_size()
        for n, p in pipe.text_embedder.model.named_parameters()
        if n.startswith(f"layers.{len(pipe.text_embedder.model.layers) - 1}.")
    )
    extra_layers = pipe.text_embedder.full_config.num_hidden_layers - len(pipe.text_embedder.model.layers)
    assert extra_layers * layer <= held < extra_layers * layer + 2**20


def test_peak_memory_resets_between_runs() -> None:
    memory = bench.PeakMemory(torch.device("cpu"))
    if not memory.resettable:
        pytest.skip("/proc/self/clear_refs is not writable here")
    memory.reset()
    # an anonymous mapping, touched then unmapped: returned to the system for certain (a freed tensor may stay
    # in the allocator's heap, so the resident size would not drop)
    big = mmap.mmap(-1, 64 * 2**20)
    big.write(b"\x01" * len(big))
    high = memory.read()
    big.close()
    memory.reset()
    assert memory.read() < high - 32 * 2**20


def test_bench_critique_finds_the_true_boxes_and_reports_each_row(tmp_path: Path) -> None:
    import bench_critique  # tools/

    out = tmp_path / "critique.json"
    assert bench_critique.main(["--size", "256x256", "--runs", "2", "--warmup", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and len(report["found"]) == 2
    assert set(report["rows"]) == {"compare 256x256", "decode 2 PNGs + compare 256x256"}
    assert all(row["cpu_ms"] > 0 and row["wall_ms"] >= row["cpu_ms"] * 0.5 for row in report["rows"].values())


@pytest.mark.slow
def test_step_cache_rows_count_skips_and_compare_with_no_cache(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    argv = ["--step-cache", "magcache:0.06", "magcache:1", "--base", "--preset", "tiny", "--sizes", "64x48"]
    assert (
        bench.main(
            [*argv, "--steps", "8", "--runs", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert "8 steps, CFG 4.0" in data["header"]
    none, default, generous = data["results"]
    assert [r["setting"] for r in (none, default, generous)] == ["none", "magcache:0.06", "magcache:1"]
    for row in (none, default, generous):
        assert row["passes_computed"] + row["passes_skipped"] == 2 * 8  # CFG: two passes a step
    assert none["passes_skipped"] == 0 and none["psnr_vs_no_cache_db"] == float("inf")
    assert 0 < default["passes_skipped"] <= generous["passes_skipped"]
    assert generous["psnr_vs_no_cache_db"] < float("inf")  # skipping changed the picture, and it was measured
    from klein_agent.model.configs import PRESETS

    assert "tiny+base" not in PRESETS, "the bench's Base copy of a preset must not outlive the run"
