#!/usr/bin/env bash
# GPU checks of issue 19 (item 5, the verbatim subset of item 4) and the fast defense's full protocol: one timed script.
#
#   bash scripts/gpu_checks.sh                       # every job at once, all done or stopped within $BUDGET seconds
#   JOBS=verbatim-full BUDGET=540 bash scripts/gpu_checks.sh   # a subset; rerun the same line to resume
#
# The jobs share the one GPU (each is bound by kernel launches, not by the device's arithmetic); every output
# folder resumes where a stopped job ended:
#   bench          python -m eval bench --device cuda --rows 1000: batched_over_loop (issue 19 target >= 20)
#   verbatim       projection-defense-gan on the first 20 test images, every inner loop on the real defense
#                  (--verbatim): clean, pgd, bpda-pgd, bpda-eot-pgd at Linf 0.3, l2 2, l2 4 (the side-by-side subset)
#   surrogate      projection-defense-gan through the full cascade on the first 100 test images (the reference figure)
#   verbatim-full  the same full cascade with --verbatim (every stage on the real defense), first 100 test images
#   fast           undefended and projection-fast, full protocol, first 200 test images
#   cuda-tests     the test files with CUDA cases (skipped on a machine without a GPU)
#   diffpure-exact DiffPure (mnist-ddpm, t* = $TSTAR, 10 DDIM steps): PGD with exact gradients through the whole
#                  reverse process at 10 / 50 / 200 steps, EOT 4, worst of 3 draws, first 20 test images, three threats
#   diffpure       DiffPure and its fixed-noise variant through the full harness cascade (convergence check,
#                  final round EOT 20, majority vote beside the worst case; curves included), first 100 test images
#   lb-dgan, lb-fast-l2, lb-diffpure-pgd-at   the leaderboard cells a CPU session cannot finish (issue 35), each the
#                  row's command (eval/leaderboard_rows.py) with --batch 100 on the device: Defense-GAN's row on
#                  today's cascade (its committed run predates the convergence check), the fast projection +
#                  mnist-classifier at L2 2 and 4 (likewise), DiffPure + mnist-pgd-at at the three threats; each with
#                  a convergence ladder of up to 4 reruns (cheap on the device: an upper bound becomes a curve). Copy each
#                  results.json to the path the leaderboard's sources table names, then `manifold-defense leaderboard
#                  --collect`:  JOBS=lb-dgan,lb-fast-l2,lb-diffpure-pgd-at BUDGET=540 bash scripts/gpu_checks.sh
# Measured on an H200 (2026-11-30): bench, verbatim and surrogate (docs/robustness.md, "Reference defense");
# not yet run on a GPU: verbatim-full, fast, cuda-tests.
# A data warm-up runs first and stops the script at once if the device, the imports or MNIST are missing.
# Outputs under $OUTDIR (default runs/gpu); with PACK=FILE.tar.gz they are packed into one file, every minute and
# at the end (so a run cut short still leaves them).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-480}
OUTDIR=${OUTDIR:-runs/gpu}
PACK=${PACK:-}
THREADS=${THREADS:-2}
JOBS=${JOBS:-bench,verbatim,surrogate,verbatim-full,fast,cuda-tests,diffpure-exact,diffpure}  # a subset reruns only those
TSTAR=${TSTAR:-150}  # DiffPure's t*: the value diffpure-tstar chose (docs/diffusion.md)
START=$SECONDS
mkdir -p "$OUTDIR"

$PY - "$DEVICE" <<'EOF' 2>&1 | tee "$OUTDIR/warmup.log" || exit 1
import sys, time
import torch
t = time.time()
device = torch.device(sys.argv[1])
if device.type == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(device), "torch", torch.__version__)
import eval.bench, eval.robustness  # noqa: F401  (the two commands' imports)
from manifold_defense.data import load_mnist
test = load_mnist("test")
print("mnist test", tuple(test.images.shape), f"warm-up {time.time() - t:.1f} s")
EOF

remaining() { echo $((BUDGET - (SECONDS - START) - 25)); }
job() {  # job NAME COMMAND...: in the background, stopped by `timeout` before the budget ends
  local name=$1; shift
  [[ ",$JOBS," == *",$name,"* ]] || return 0
  echo "== $name: $*" | tee "$OUTDIR/$name.log"
  ( s=$SECONDS; timeout "$(remaining)" "$@" >> "$OUTDIR/$name.log" 2>&1; rc=$?
    echo "== $name: exit $rc after $((SECONDS - s)) s" | tee -a "$OUTDIR/$name.log" ) &
}

job bench $PY -m eval bench --out "$OUTDIR/bench" --device "$DEVICE" --rows 1000 --threads "$THREADS"
job verbatim $PY -m eval robustness --out "$OUTDIR/robustness-dgan-verbatim" --defenses projection-defense-gan \
  --n 20 --dgan-n 20 --batch 20 --verbatim --attacks clean,pgd,bpda-pgd,bpda-eot-pgd --no-curves \
  --device "$DEVICE" --threads "$THREADS" --no-progress
job surrogate $PY -m eval robustness --out "$OUTDIR/robustness-dgan" --defenses projection-defense-gan \
  --n 100 --dgan-n 100 --batch 100 --device "$DEVICE" --threads "$THREADS" --no-progress
job verbatim-full $PY -m eval robustness --out "$OUTDIR/robustness-dgan-verbatim-full" \
  --defenses projection-defense-gan --n 100 --dgan-n 100 --batch 100 --verbatim --device "$DEVICE" \
  --threads "$THREADS" --no-progress
job fast $PY -m eval robustness --out "$OUTDIR/robustness-n200" --defenses undefended,projection-fast --n 200 \
  --batch 200 --device "$DEVICE" --threads "$THREADS" --no-progress
job cuda-tests $PY -m pytest -q -p no:cacheprovider tests/test_inversion_cuda.py tests/test_attacks_cuda.py \
  tests/test_ambient.py -rs
job diffpure-exact $PY -m eval diffpure-exact --out "$OUTDIR/diffpure-exact" --t-star "$TSTAR" --n 20 --batch 20 \
  --pgd-steps 10,50,200 --eot 4 --draws 3 --device "$DEVICE" --threads "$THREADS"
job diffpure $PY -m eval robustness --out "$OUTDIR/robustness-diffpure" --defenses diffpure,diffpure-fixed \
  --diffpure-t-star "$TSTAR" --n 100 --final-eot 20 --majority --batch 100 --device "$DEVICE" --threads "$THREADS" \
  --no-progress
job lb-dgan $PY -m eval robustness --out "$OUTDIR/lb-dgan-classifier" --defenses projection-defense-gan --dgan-n 100 \
  --n 100 --batch 100 --convergence-rounds 4 --device "$DEVICE" --threads "$THREADS" --no-progress
job lb-fast-l2 $PY -m eval robustness --out "$OUTDIR/lb-fast-classifier-l2" --defenses projection-fast --n 100 \
  --batch 100 --threats l2-2,l2-4 --convergence-rounds 4 --device "$DEVICE" --threads "$THREADS" --no-progress
job lb-diffpure-pgd-at $PY -m eval robustness --out "$OUTDIR/lb-diffpure-pgd-at" --defenses diffpure --classifier \
  mnist-pgd-at --diffpure-t-star "$TSTAR" --final-eot 20 --majority --no-curves --n 100 --batch 100 \
  --convergence-rounds 4 --device "$DEVICE" --threads "$THREADS" --no-progress
if [ -n "$PACK" ]; then  # pack every minute too, so a run cut short still leaves its outputs
  ( while sleep 60; do tar czf "$PACK.part" "$OUTDIR" 2> /dev/null && mv "$PACK.part" "$PACK"; done ) > /dev/null 2>&1 &
  PACKER=$!
fi
if command -v nvidia-smi > /dev/null; then (sleep 30; nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1) & fi
pids=$(jobs -p | grep -v "^${PACKER:-none}$")
[ -n "$pids" ] && wait $pids  # not the packer: it stops below
[ -n "${PACKER:-}" ] && { pkill -P "$PACKER"; kill "$PACKER"; } 2> /dev/null
grep -h "batched_over_loop" "$OUTDIR"/bench/results.md 2>/dev/null || true
echo "== all jobs ended after $((SECONDS - START)) s"
if [ -n "$PACK" ]; then tar czf "$PACK" "$OUTDIR" && ls -la "$PACK"; fi
