#!/usr/bin/env bash
# The CBNN collapse case and its damping on scikit-learn's digits (the low-error regime: a checkpoint's
# training error of a few %): WRN-16-1 at 16x16, 24 epochs, batch 32, seed 0, M = 3, as the digits
# table of docs/ENSEMBLES.md.   scripts/cbnn_evidence_digits.sh OUT [RUN ...]   RUN: samme cap (default both)
set -euo pipefail
OUT=${1:?usage: $0 OUT [RUN ...]}
shift
RUNS=("$@")
[ ${#RUNS[@]} -eq 0 ] && RUNS=(samme cap)
COMMON=(--model wide_resnet16_1 --data digits --image-size 16 --crop-padding 2 --no-flip --epochs 24
        --batch-size 32 --seed 0 --device cpu --no-progress --no-tensorboard --method cbnn --checkpoints 3)
mkdir -p "$OUT"
for run in "${RUNS[@]}"; do
  case $run in
    samme) options=(--cbnn-shrinkage 1 --cbnn-weight-ratio 0) ;;   # plain SAMME
    cap)   options=(--cbnn-shrinkage 1 --cbnn-weight-ratio 4) ;;
    *) echo "unknown run '$run' (expected samme or cap)" >&2; exit 2 ;;
  esac
  [ -f "$OUT/$run/members.json" ] && grep -q '"complete": true' "$OUT/$run/members.json" && continue
  python -m divco train "${COMMON[@]}" "${options[@]}" --out "$OUT/$run"
done
for run in "${RUNS[@]}"; do python -m divco eval "$OUT/$run"; done
