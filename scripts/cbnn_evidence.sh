#!/usr/bin/env bash
# CBNN evidence on real CIFAR-10: single vs snapshot vs cbnn (plain SAMME and the damped default),
# the same budget for all (WRN-16-1, 16x16 images, 10k training images, the full 10k test images,
# 15 epochs, batch 128, seed 0, M = 3 members). Prints the table of docs/ENSEMBLES.md.
#
#   scripts/cbnn_evidence.sh DATA OUT [RUN ...]     # RUN: single snapshot samme shrink cap cap2 (default: all)
#   scripts/cbnn_evidence.sh DATA OUT table          # only print the table of the runs in OUT
#
# DATA: the CIFAR-10 archive (../shared/data/cifar10-jpg.tar.xz) or folder. Each run is one
# `divco train`; runs already complete in OUT are skipped (a partial one is resumed).
set -euo pipefail
DATA=${1:?usage: $0 DATA OUT [RUN ...]}
OUT=${2:?usage: $0 DATA OUT [RUN ...]}
shift 2
RUNS=("$@")
[ ${#RUNS[@]} -eq 0 ] && RUNS=(single snapshot samme shrink cap cap2)
EPOCHS=${EPOCHS:-15}
COMMON=(--model wide_resnet16_1 --data "$DATA" --recipe quick --image-size 16 --train-subset 10000
        --epochs "$EPOCHS" --batch-size 128 --seed 0 --device cpu --keep-checkpoints "$EPOCHS"
        --no-progress --no-tensorboard)
mkdir -p "$OUT"

method_options() {
  case $1 in
    single)   echo "--method cotrain --branches 1" ;;
    snapshot) echo "--method snapshot --checkpoints 3" ;;
    samme)    echo "--method cbnn --checkpoints 3 --cbnn-shrinkage 1 --cbnn-weight-ratio 0" ;;   # plain SAMME
    shrink)   echo "--method cbnn --checkpoints 3 --cbnn-shrinkage 0.1 --cbnn-weight-ratio 0" ;;
    cap)      echo "--method cbnn --checkpoints 3 --cbnn-shrinkage 1 --cbnn-weight-ratio 4" ;;
    cap2)     echo "--method cbnn --checkpoints 3 --cbnn-shrinkage 1 --cbnn-weight-ratio 2" ;;
    *) echo "unknown run '$1' (expected single, snapshot, samme, shrink, cap or cap2)" >&2; exit 2 ;;
  esac
}

for run in "${RUNS[@]}"; do
  [ "$run" = table ] && continue
  dir="$OUT/$run"
  if [ -f "$dir/done" ]; then echo "$run: done, skipped"; continue; fi
  resume=()
  ls "$dir"/checkpoint-e*.pt >/dev/null 2>&1 && resume=(--resume)
  # shellcheck disable=SC2046
  python -m divco train "${COMMON[@]}" $(method_options "$run") --out "$dir" "${resume[@]}"
  touch "$dir/done"
done

python "$(dirname "$0")/cbnn_evidence_table.py" "$OUT" --epochs "$EPOCHS"
