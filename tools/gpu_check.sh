#!/usr/bin/env bash
# One device call that measures the GPU plan (issue 13, point 5); prints a short table last, writes the full log
# and a JSON of figures under $OUT. Budget: <= 10 minutes on an H100/H200 with the defaults (the step-cache rows
# add about 2: 12 Base pictures of 50 steps with CFG).
#
# On the device machine (its Python 3.12 has torch + CUDA; the rest travels as wheels in the ignored, carried
# folder .whl, as /work/.library/device/README.md describes):
#   bash tools/gpu_check.sh                       # carry: [".whl"]
# Wheels to put in .whl once (here, from the repo root; .whl is in .gitignore): python tools/gpu_wheels.py
#   (diffusers, the MCP SDK and their requirements at this venv's versions, less what the device image has;
#   22 wheels, ~10 MiB of the 64 MiB a call may carry).
# The project itself is not installed: the repository root and tools/ go on PYTHONPATH.
#
# The first-picture step starts `klein-agent serve` and calls it over MCP stdio when the mcp package imports (its
# wheels and their dependencies in .whl), else it times `klein-agent generate` (see tools/bench_first_picture.py).
#
# CPU rehearsal (tiny shapes, every step and the table, no wheels needed in the venv):
#   OUT=/tmp/gpu_check PRESET=tiny DEVICE=cpu RUNS=2 WARMUP=1 BIG=64x64 SMALL=32x32 REF=64x64 PY=python bash tools/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
PRESET=${PRESET:-klein-4b}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-20}
WARMUP=${WARMUP:-3}
BIG=${BIG:-1024x1024}
SMALL=${SMALL:-512x512}
REF=${REF:-1024x1024}
STEP_LIMIT=${STEP_LIMIT:-150}   # seconds per step; a hung step costs its limit, not the call
COMPILE_LIMIT=${COMPILE_LIMIT:-240}  # the compiled steps (their bucket warm-up compiles with max-autotune)
WARM=${WARM:-2}                 # the shape buckets `serve --compile` warms before its first picture (rules.buckets)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "wheel install failed (see $LOG)"; tail -20 "$LOG"; exit 2; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/tools:${PYTHONPATH:-}
PY=${PY:-python3}

{
  echo "== $(date -u +%FT%TZ) gpu_check: preset $PRESET on $DEVICE, $RUNS runs after $WARMUP warm-up"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "(no nvidia-smi)"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$LOG"

step() {  # step NAME ARGS... : one bench.py run, its JSON at $OUT/NAME.json, wall time recorded
  local name=$1; shift
  echo "== step $name: bench.py $*" | tee -a "$LOG"
  local start=$SECONDS
  local limit=$STEP_LIMIT
  case " $* " in *" --compile "*) limit=$COMPILE_LIMIT ;; esac
  timeout "$limit" $PY tools/bench.py --preset "$PRESET" --device "$DEVICE" --json "$OUT/$name.json" "$@" \
    >>"$LOG" 2>&1
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start))}" >"$OUT/$name.status.json"
  echo "   rc $rc in $((SECONDS - start)) s" | tee -a "$LOG"
}

# 1. text-to-image at both sizes, ours vs diffusers interleaved (bf16 default on CUDA), per stage, retry, peak
step t2i --sizes "$BIG" "$SMALL" --refs 0 --runs "$RUNS" --warmup "$WARMUP"
# 2. an edit with one reference of REF
step edit --sizes "$BIG" --refs 1 --ref-size "$REF" --runs "$RUNS" --warmup "$WARMUP"
# 3. peak memory with the text encoder offloaded (ours only)
step offload --sizes "$BIG" --refs 0 --runs 3 --warmup 1 --offload-text-encoder --no-reference
# 4. compiled (the first warm-up includes compilation: its step time is the compile cost at one size)
step compiled --sizes "$BIG" --refs 0 --runs "$RUNS" --warmup 2 --compile --no-reference
# 5. FP8 compiled: speed and PSNR against the unquantized picture (the gate fails the step under 25 dB)
step fp8 --sizes "$BIG" --refs 0 --runs "$RUNS" --warmup 2 --compile --fp8 --no-reference
# 6. step cache (issue 23.3): Base 4B shape, 50 steps with CFG, each setting against no cache (passes skipped, wall
#    time, PSNR vs no cache); then the distilled 4-step model, to see whether any setting helps there
step step_cache --step-cache magcache:0.06 magcache:0.12 magcache:0.25 --base --sizes "$BIG" --runs 2 --warmup 1
step step_cache_distilled --step-cache magcache:0.06 magcache:0.25 --sizes "$BIG" --runs 5 --warmup 1

# 7. serve start to the first finished picture (BIG, compiled, buckets WARM warmed before ready), random weights
echo "== step first_picture: serve --model random:$PRESET --compile --warm-buckets $WARM" | tee -a "$LOG"
start=$SECONDS
timeout "$COMPILE_LIMIT" $PY tools/bench_first_picture.py --model "random:$PRESET" --size "${BIG%x*}" \
  --log "$OUT/first_picture_server.log" --json "$OUT/first_picture.json" \
  -- --device "$DEVICE" --compile --warm-buckets "$WARM" >>"$LOG" 2>&1
rc=$?
echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start))}" >"$OUT/first_picture.status.json"
echo "   rc $rc in $((SECONDS - start)) s" | tee -a "$LOG"

$PY - "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
figures = {}
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}
for name in ("t2i", "edit", "offload", "compiled", "fp8"):
    status = out / f"{name}.status.json"
    data = load(name)
    figures[name] = {"status": json.loads(status.read_text()) if status.exists() else None,
                     "rows": data.get("results", []), "warm_up_s": data.get("warm_up_s", {})}
first = load("first_picture")
first_status = out / "first_picture.status.json"
figures["first_picture"] = {"status": json.loads(first_status.read_text()) if first_status.exists() else None,
                            "figures": first}
for name in ("step_cache", "step_cache_distilled"):
    status = out / f"{name}.status.json"
    figures[name] = {"status": json.loads(status.read_text()) if status.exists() else None,
                     "cache_rows": load(name).get("results", [])}
(out / "figures.json").write_text(json.dumps(figures, indent=2))
targets = {("t2i", 0): "<= 250 ms", ("t2i", 1): "<= 80 ms", ("edit", 0): "<= 550 ms"}
print("\n| case | size | refs | ours e2e ms | reference ms | ratio (>= 1.5) | peak GiB | target | extra |")
print("|---|---|---|---|---|---|---|---|---|")
for name, data in figures.items():
    if name == "first_picture":
        continue
    if name.startswith("step_cache"):
        continue
    st = data["status"]
    if not data["rows"]:
        print(f"| {name} | – | – | FAILED (rc {st and st['rc']}) | | | | | |")
        continue
    for k, r in enumerate(data["rows"]):
        ref = f"{r['reference_ms']:.1f}" if r["reference_ms"] else "–"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "–"
        extra = f"fp8 vs bf16 {r['fp8_psnr_db']:.1f} dB" if r.get("fp8_psnr_db") is not None else ""
        if name in ("compiled", "fp8") and data["warm_up_s"]:
            extra = "bucket warm-up " + ", ".join(f"{b}: {s:.1f} s" for b, s in data["warm_up_s"].items())
        print(f"| {name} | {r['size']} | {r['references']} | {r['ours']['end to end']:.1f} | {ref} | {ratio} "
              f"| {r['peak_memory_bytes'] / 2**30:.2f} | {targets.get((name, k), '')} | {extra} |")
for name in ("step_cache", "step_cache_distilled"):
    rows = figures[name]["cache_rows"]
    print(f"\n{name}:\n| size | cache | passes computed / skipped | end to end ms | speed-up | PSNR vs no cache |")
    print("|---|---|---|---|---|---|")
    if not rows:
        print(f"FAILED (rc {figures[name]['status'] and figures[name]['status']['rc']})")
    for r in rows:
        print(f"| {r['size']} | {r['setting']} | {r['passes_computed']} / {r['passes_skipped']} "
              f"| {r['end_to_end_ms']:.0f} | {r['end_to_end_speedup']:.2f}x | {r['psnr_vs_no_cache_db']:.1f} |")
if first:
    print(f"\nserve start -> first {first['size']}x{first['size']} picture ({first['via']}, --compile, buckets warmed "
          f"first): {first['first_picture_s']:.1f} s (initialize {first['initialize_s']} s, model load "
          f"{first['load_s']} s, bucket warm-up {first['warm_up_s']} s)")
else:
    print(f"\nserve start -> first picture: FAILED (rc {figures['first_picture']['status']})")
PYEOF
echo "full log: $LOG; figures: $OUT/figures.json"
