#!/usr/bin/env bash
# The CIFAR-10 checkpoint-ensemble comparison of docs/ENSEMBLES.md: single, cbnn, fge, swa and snapshot at one
# budget (WRN-16-1, 16x16 images, 5,000 training images, 1,000 held out for validation, the full 10,000 test
# images, batch 128, seed 0, no mixup or erasing, EPOCHS epochs, M = 3 members), one run at a time.
#
#   scripts/checkpoint_ensembles_cifar10.sh DATA OUT      # DATA: ../shared/data/cifar10-jpg.tar.xz or its folder
#
# Runs already finished in OUT are reused and a stopped one is resumed, so the same command continues; the
# table is OUT/checkpoint-ensembles.md (and .json, .png).
set -euo pipefail
DATA=${1:?usage: $0 DATA OUT}
OUT=${2:?usage: $0 DATA OUT}
EPOCHS=${EPOCHS:-30}
exec nice -n 10 python -m divco checkpoint-ensembles --model wide_resnet16_1 --data "$DATA" --recipe quick \
  --image-size 16 --train-subset 5000 --val-split 1000 --epochs "$EPOCHS" --batch-size 128 --seed 0 --device cpu \
  --keep-checkpoints "$EPOCHS" --no-progress --no-tensorboard --mixup-alpha 0 --erase-p 0 \
  --method single cbnn fge swa snapshot --out "$OUT"
