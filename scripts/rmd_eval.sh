#!/usr/bin/env bash
# The classifier-alone figures of issue 17 (docs/robust-manifold.md) for one robustly trained zoo classifier.
#
#   bash scripts/rmd_eval.sh MODEL WEIGHTS_DIR [OUT]     # e.g. bash scripts/rmd_eval.sh mnist-l2-at runs/l2-at
#
# Every figure is merged into MODEL's record in WEIGHTS_DIR (`--write`, after checking the weights' SHA-256), so
# copying the weights and the record into the package zoo carries them. Sizes: N_PGD (default 1000) for clean and
# l2 PGD-100 at 2.5, N_AA (500) for AutoAttack l2 1.5 / 2.5, N_LINF (1000) for AutoAttack Linf 0.3, N_ONM (200)
# and ONM_STEPS (1000) for the on-manifold curve at pixel l2 1.5, N_OP (100) and OP_STEPS (3000) for the overpowered
# curve at pair l2 1.5 (logits / OP_T, default 10). THREADS (default 1) torch threads per command. Each output
# folder resumes or refuses a changed protocol (see the commands' help).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
DIR=$2
OUT=${3:-runs/eval-$MODEL}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
N_PGD=${N_PGD:-1000}
N_AA=${N_AA:-500}
N_LINF=${N_LINF:-1000}
N_ONM=${N_ONM:-200}
ONM_STEPS=${ONM_STEPS:-1000}
N_OP=${N_OP:-100}
OP_STEPS=${OP_STEPS:-3000}
OP_T=${OP_T:-10}
common=(--model "$MODEL" --weights-dir "$DIR" --threads "$THREADS" --no-progress --write)
run() { echo "== $*"; local s=$SECONDS; "$@"; echo "== $((SECONDS - s)) s"; }
run $PY -m eval autoattack "${common[@]}" --n "$N_PGD" --norm l2 --eps 2.5 --pgd-steps 100 --out "$OUT/pgd100-l2-2.5"
run $PY -m eval autoattack "${common[@]}" --n "$N_AA" --norm l2 --eps 1.5 --out "$OUT/aa-l2-1.5"
run $PY -m eval autoattack "${common[@]}" --n "$N_AA" --norm l2 --eps 2.5 --out "$OUT/aa-l2-2.5"
run $PY -m eval autoattack "${common[@]}" --n "$N_LINF" --norm linf --eps 0.3 --out "$OUT/aa-linf-0.3"
run $PY -m eval defense --classifier "$MODEL" --classifier-dir "$DIR" --figures onmanifold --n "$N_ONM" \
  --latent-eps 1.5 --latent-steps "$ONM_STEPS" --threads "$THREADS" --no-progress --write --out "$OUT/onmanifold"
run $PY -m eval defense --classifier "$MODEL" --classifier-dir "$DIR" --figures overpowered --n "$N_OP" \
  --op-eps 1.5 --op-steps "$OP_STEPS" --op-temperature "$OP_T" --threads "$THREADS" --no-progress --write \
  --out "$OUT/overpowered"
