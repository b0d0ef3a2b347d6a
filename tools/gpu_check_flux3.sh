#!/usr/bin/env bash
# FLUX 3 [klein] on the GPU at the real shape (issue 21, point 6), as one device call: tools/bench.py --flux3 rows for
# the distilled model at 1024² and 2048² with 0, 1 and 4 references (ours vs diffusers' modular pipeline on the same
# random weights and prompt embeddings, interleaved, bf16), then the computed memory figure (tools/flux3_memory.py:
# distilled, 1024², bf16, text encoder offloaded) beside the measured CUDA peak. Budget: about 6-8 minutes on an H100.
#   bash tools/gpu_check_flux3.sh                  # carry: [".whl"] (diffusers' wheels, see tools/gpu_check.sh)
# CPU rehearsal: OUT=/tmp/f3 PRESET=flux3-tiny DEVICE=cpu SIZES="64x64" REF=64x64 RUNS=1 PY=python bash tools/gpu_check_flux3.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_flux3_out}
PRESET=${PRESET:-flux3-klein}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-3}
SIZES=${SIZES:-1024x1024 2048x2048}
REF=${REF:-1024x1024}
LIMIT=${LIMIT:-420}
mkdir -p "$OUT"
LOG="$OUT/gpu_check_flux3.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "wheel install failed (see $LOG)"; tail -20 "$LOG"; exit 2; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/tools:${PYTHONPATH:-}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee -a "$LOG"
# shellcheck disable=SC2086  # SIZES is a list
timeout "$LIMIT" $PY tools/bench.py --flux3 --preset "$PRESET" --device "$DEVICE" --sizes $SIZES --refs 0 1 4 \
  --ref-size "$REF" --runs "$RUNS" --warmup 1 --json "$OUT/flux3.json" 2>&1 | grep -v "it/s" | tee -a "$LOG"
echo "bench rc ${PIPESTATUS[0]}" | tee -a "$LOG"
$PY tools/flux3_memory.py --preset "$PRESET" --size 1024x1024 2>&1 | tee -a "$LOG"
$PY - "$OUT/flux3.json" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
rows = json.loads(path.read_text())["flux3_results"] if path.exists() else []
print("| size | refs | ours ms | reference ms | ratio | PSNR vs reference | ours peak GiB (text tower resident) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    peak = f"{r['ours_peak_bytes'] / 2**30:.2f}" if r.get("ours_peak_bytes") else "–"
    print(f"| {r['size']} | {r['references']} | {r['ms']['ours']:.0f} | {r['ms']['reference']:.0f} | "
          f"{r['ratio']:.2f}x | {r['psnr_vs_reference_db']:.1f} dB | {peak} |")
PYEOF
