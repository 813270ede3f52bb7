#!/usr/bin/env bash
# Branch-parallel vs DDP on a machine with 2+ GPUs (NCCL), at most 4 minutes: a call after
# scripts/gpu_suite.sh and scripts/gpu_evidence.sh where the device tool lends several GPUs.
# NOT RUN YET: no multi-GPU machine was lent to the session that wrote it.
#
# WRN-16-8 divided by S = 4 on CIFAR-10 (the archive of scripts/gpu_evidence.sh), bf16, the
# same short budget for both runs, through the real engine under torchrun with P = 2 or 4 GPUs:
#
#   run   limit + kill grace
#   data    30 s + 5 s   decode the archive once into a cache both runs read
#   ddp     80 s + 5 s   torchrun --nproc_per_node=P divco train ...                  (G = 1)
#   bp      80 s + 5 s   torchrun --nproc_per_node=P divco train ... --branch-parallel P  (S/P branches each)
#   (margin 15 s)        the table: images/s of the last epoch, test accuracy, exit
#
#   bash scripts/gpu_branch_parallel.sh OUT_DIR             # on 2+ GPUs
#   bash scripts/gpu_branch_parallel.sh --dry-run OUT_DIR   # CPU rehearsal: the plan, each run's options
#       resolved by divco train --print-config with WORLD_SIZE=P (its branch_parallel entry), no training
#
# The bytes per step of each mode are measured on the CPU (python -m divco.benchmark.branch_parallel,
# docs/BRANCH_PARALLEL.md); this script measures what they cost in step time over NVLink/PCIe.
# Environment: PYTHON (python3), DIVCO_EVIDENCE_DATA (.data/cifar10-jpg.tar.xz), DIVCO_BP_MODEL
#   (wide_resnet16_8), DIVCO_BP_BRANCHES (4), DIVCO_BP_EPOCHS (2), DIVCO_BP_BATCH (256), DIVCO_BP_PROCESSES
#   (the GPUs, at most S; 2 in a dry run).
set -u -o pipefail

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
OUT_DIR=${1:-gpu-branch-parallel}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DIVCO_EVIDENCE_DATA:-$REPO/.data/cifar10-jpg.tar.xz}
MODEL=${DIVCO_BP_MODEL:-wide_resnet16_8}
S=${DIVCO_BP_BRANCHES:-4}
EPOCHS=${DIVCO_BP_EPOCHS:-2}
BATCH=${DIVCO_BP_BATCH:-256}
BUDGET=240
DATA_LIMIT=30
RUN_LIMIT=80
KILL_GRACE=5
MARGIN=15

mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$REPO" || exit 1
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/divco-bp.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
fail() { echo "gpu_branch_parallel: error: $*"; exit 2; }

if (( DRY_RUN )); then
    P=${DIVCO_BP_PROCESSES:-2}
else
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    (( gpus >= 2 )) || fail "needs 2+ GPUs, nvidia-smi lists ${gpus:-0}"
    P=${DIVCO_BP_PROCESSES:-$(( gpus < S ? gpus : S ))}
fi
(( S % P == 0 )) || fail "the $P processes must divide S = $S (one branch group per GPU)"
plan_total=$(( DATA_LIMIT + 2 * RUN_LIMIT + 3 * KILL_GRACE ))
echo "=== divco branch-parallel vs DDP$( ((DRY_RUN)) && echo ' (DRY RUN)' ): $P processes, $MODEL x$S, batch $BATCH"
echo "plan: data ${DATA_LIMIT}s + 2 runs x ${RUN_LIMIT}s + 3 x ${KILL_GRACE}s kill grace = ${plan_total}s + ${MARGIN}s margin of a ${BUDGET}s budget"
(( plan_total + MARGIN <= BUDGET )) || { echo "PLAN DOES NOT FIT"; exit 3; }

data=$DATA
if [[ ! -f $DATA ]]; then
    (( DRY_RUN )) || fail "no CIFAR-10 archive at $DATA (see scripts/gpu_evidence.sh)"
    data=digits
fi
run_args() {  # $1: ddp or bp, $2: the run folder
    echo train --model "$MODEL" --branches "$S" --data "$data" --recipe cifar10 --epochs "$EPOCHS" \
        --batch-size "$BATCH" --device cuda --precision bf16 --cache-dir "$SCRATCH/cache" --no-progress \
        --no-tensorboard --keep-checkpoints 1 --out "$2"
    [[ $1 == bp ]] && echo --branch-parallel "$P"
}

if (( DRY_RUN )); then
    for way in ddp bp; do
        # shellcheck disable=SC2046
        args=$(run_args "$way" "$SCRATCH/$way" | tr '\n' ' ' | sed 's/--device cuda/--device cpu/')
        # shellcheck disable=SC2086
        WORLD_SIZE=$P $PYTHON -m divco $args --print-config > "$SCRATCH/$way.json" \
            || fail "divco train refuses the $way run's options"
        $PYTHON - "$SCRATCH/$way.json" "$way" <<'PYEOF' || exit 1
import json, sys
plan = json.load(open(sys.argv[1]))
mesh = plan.get("branch_parallel")
print(f"  {sys.argv[2]}: {plan['model']['name']} x{plan['model']['branches']}, {plan['steps_per_epoch']} steps/epoch, "
      + (f"{mesh['branch_groups']} branch groups x {mesh['data_parallel']} data shards, "
         f"{mesh['branches_per_process']} branch(es) per process" if mesh else "DDP"))
PYEOF
    done
    echo "DRY RUN OK: 2 runs would train"
    exit 0
fi

echo "=== data (limit ${DATA_LIMIT}s)"
timeout -s INT -k "$KILL_GRACE" "$DATA_LIMIT" $PYTHON -c "
import sys
from divco.data.sources import load_dataset
load_dataset(sys.argv[1], cache_dir=sys.argv[2])" "$DATA" "$SCRATCH/cache" || echo "data: not decoded in time"
for way in ddp bp; do
    echo "=== $way (limit ${RUN_LIMIT}s)"
    # shellcheck disable=SC2046
    timeout -s INT -k "$KILL_GRACE" "$RUN_LIMIT" $PYTHON -m torch.distributed.run --standalone \
        --nproc_per_node="$P" -m divco $(run_args "$way" "$SCRATCH/$way" | tr '\n' ' ')
    echo "$way: exit $?"
done
$PYTHON - "$SCRATCH" "$OUT_DIR" "$P" <<'PYEOF'
import json, sys
from pathlib import Path
scratch, out, P = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
lines = [f"| mode | processes | epochs | images/s (last epoch) | test acc (ensemble) % |", "|---|---|---|---|---|"]
for way, name in (("ddp", "DDP"), ("bp", f"branch-parallel G={P}")):
    path = scratch / way / "metrics.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    last = records[-1] if records else {}
    ips, acc = last.get("images_per_s"), last.get("test_ensemble_acc")
    lines.append(f"| {name} | {P} | {len(records)} | {'-' if ips is None else f'{ips:.0f}'} | "
                 f"{'-' if acc is None else f'{100 * acc:.2f}'} |")
(out / "branch_parallel.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
