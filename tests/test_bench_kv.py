"""tools/bench.py --kv runs the klein 9B-KV rows on CPU: every column, the same-run reference and its picture check."""

from __future__ import annotations

import json
from pathlib import Path

import bench  # tools/ is on sys.path (conftest)
import pytest

pytestmark = pytest.mark.slow  # four pipelines (ours, retry, t2i, diffusers) per row


def test_bench_kv_reports_first_call_retry_text_to_image_and_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    argv = ["--kv", "--preset", "tiny", "--sizes", "64x48", "--refs", "1", "2", "--ref-size", "96x64"]
    assert bench.main([*argv, "--runs", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "KV semantics" in data["header"]
    rows = data["kv_results"]
    assert [(r["size"], r["references"]) for r in rows] == [("64x48", 1), ("64x48", 2)]
    for row in rows:
        assert set(row["ms"]) == {"first call", "retry", "text-to-image", "reference"}
        assert all(v > 0 for v in row["ms"].values())
        assert row["kv_bytes"] > 0  # the retry's keys and values were kept
        assert row["psnr_vs_reference_db"] >= 45  # same weights and noise: the same picture
        flops = row[
            "tflop"
        ]  # counted, attention included: the retry skips the references' tokens, not their keys
        assert flops["text-to-image"] < flops["retry"] < flops["first call"]
    assert (
        rows[1]["tflop"]["retry"] > rows[0]["tflop"]["retry"]
    )  # two kept references cost more attention than one
