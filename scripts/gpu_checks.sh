#!/usr/bin/env bash
# GPU checks of issue 19 (item 5), prepared on the CPU and not yet measured on a GPU.
#
#   bash scripts/gpu_checks.sh            # smoke: the same commands on few points (a few minutes)
#   MODE=full bash scripts/gpu_checks.sh  # the verbatim full protocol of projection-defense-gan + the benchmark
#
# Each step runs under `timeout` ($STEP_LIMIT seconds) and prints its wall time; every output folder resumes
# where an interrupted step stopped (rerun the same command). Outputs under $OUT (default runs/gpu-$MODE).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODE=${MODE:-smoke}
OUT=${OUT:-runs/gpu-$MODE}
DEVICE=${DEVICE:-cuda}
STEP_LIMIT=${STEP_LIMIT:-3000}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1

step() {  # step NAME COMMAND...: run with a time limit, report the status and seconds
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$STEP_LIMIT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (log $OUT/$name.log)"
  tail -n 12 "$OUT/$name.log"
}

if [ "$MODE" = full ]; then
  # the projection benchmark: batched_over_loop is its last lines (target >= 20 on a GPU)
  step bench $PY -m eval bench --out "$OUT/bench" --device "$DEVICE"
  # Defense-GAN's schedule through the full cascade with every inner loop on the real defense (--verbatim),
  # first 100 test images, Linf 0.3, l2 2, l2 4
  step dgan-verbatim $PY -m eval robustness --out "$OUT/robustness-dgan-verbatim" --defenses projection-defense-gan \
    --n 100 --dgan-n 100 --verbatim --device "$DEVICE" --no-progress
  # the surrogate path on the same points, for the side-by-side
  step dgan-surrogate $PY -m eval robustness --out "$OUT/robustness-dgan" --defenses projection-defense-gan \
    --n 100 --dgan-n 100 --device "$DEVICE" --no-progress
else
  step bench $PY -m eval bench --quick --out "$OUT/bench" --device "$DEVICE"
  step dgan-verbatim $PY -m eval robustness --quick --out "$OUT/robustness-dgan-verbatim" \
    --defenses projection-defense-gan --n 5 --dgan-n 5 --verbatim --device "$DEVICE" --no-progress
fi
grep -h "batched_over_loop" "$OUT"/bench/results.md 2>/dev/null || true
