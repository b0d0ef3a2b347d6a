"""tools/bench.py runs on CPU and reports every stage, the reference and the ratio (its GPU use is the same code)."""

from __future__ import annotations

import json
from pathlib import Path

import bench  # tools/ is on sys.path (conftest)


def test_bench_reports_stages_and_the_reference_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--sizes", "64x48", "--refs", "0", "1", "--ref-size", "96x64"]
    assert bench.main([*argv, "--runs", "2", "--warmup", "1", "--fp8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "fp8" in data["header"] and "float32" in data["header"]
    rows = data["results"]
    assert [(r["size"], r["references"]) for r in rows] == [("64x48", 0), ("64x48", 1)]
    for row in rows:
        stages = row["ours"]
        assert {"text", "references", "step 1", "step 4", "decode", "end to end", "retry (cached)"} <= set(
            stages
        )
        assert all(v >= 0 for v in stages.values())
        assert row["reference_ms"] > 0
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
    assert any(k.startswith("inpaint 64x64") for k in results) and all(v > 0 for v in results.values())
