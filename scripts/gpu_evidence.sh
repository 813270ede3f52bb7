#!/usr/bin/env bash
# The second call of a GPU day (after scripts/gpu_suite.sh), at most 5 minutes: real CIFAR-10,
# WRN-16-8 at S = 1, 2 and 4 for a fixed short budget (the same epochs for every run), bf16,
# channels_last, the training step captured; per S and per way (S = 1: the undivided network;
# S > 1: divco's branch-batched execution and the per-branch one) it prints test accuracy (the
# ensemble's), training images/s (the last epoch: the first one holds the capture) and peak GPU
# memory, in one table. On a machine with 2+ GPUs, scripts/gpu_branch_parallel.sh adds the row
# branch-parallel vs DDP (NCCL; planned, not run yet).
#
#   phase   limit + kill grace
#   data      30 s + 5 s   decode the archive once into a cache every run reads
#   runs   5 x 45 s + 5 s  divco train, one process per run (SIGINT at its limit: divco train
#                          stops after a checkpoint and its finished epochs still count)
#   (margin   15 s)        the table
#
#   bash scripts/gpu_evidence.sh OUT_DIR             # on a CUDA machine
#   bash scripts/gpu_evidence.sh --dry-run OUT_DIR   # CPU rehearsal: the plan, the budget check,
#       every run's options resolved by divco train --print-config (one process), no training
#
# The data: the archive cifar10-jpg.tar.xz (../shared/data/README.md) copied into the project's
# git-ignored .data/ folder, which the device call names in `carry`:
#
#   mkdir -p .data && cp ../shared/data/cifar10-jpg.tar.xz .data/
#   run(command="bash scripts/gpu_evidence.sh $OUT", carry=[".data"])
#
# Everything lands in OUT_DIR (3 files): evidence.log (the console), evidence.md (the table),
# evidence.json (one record per run).
#
# Environment: PYTHON (default python3), DIVCO_EVIDENCE_DATA (default .data/cifar10-jpg.tar.xz),
#   DIVCO_EVIDENCE_MODEL (wide_resnet16_8), DIVCO_EVIDENCE_EPOCHS (3), DIVCO_EVIDENCE_BATCH (128),
#   DIVCO_EVIDENCE_BUDGET (300), DIVCO_EVIDENCE_RUN_LIMIT (45), DIVCO_EVIDENCE_CAPTURE (see
#   STEP_CAPTURE below), DIVCO_EVIDENCE_RUNS ("S|way" entries, ';' between them).
set -u -o pipefail

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
OUT_DIR=${1:-${OUT:-gpu-evidence}}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DIVCO_EVIDENCE_DATA:-$REPO/.data/cifar10-jpg.tar.xz}
MODEL=${DIVCO_EVIDENCE_MODEL:-wide_resnet16_8}
EPOCHS=${DIVCO_EVIDENCE_EPOCHS:-3}
BATCH=${DIVCO_EVIDENCE_BATCH:-128}
BUDGET=${DIVCO_EVIDENCE_BUDGET:-300}
RUN_LIMIT=${DIVCO_EVIDENCE_RUN_LIMIT:-45}
DATA_LIMIT=30
KILL_GRACE=5
MARGIN=15
# How the training step is captured. "auto": the whole step as one CUDA graph
# (`divco train --capture cuda-graph`) where divco train has that option, else torch.compile
# of the forward pass and loss (`--compile`, which costs a compile per run). Set
# DIVCO_EVIDENCE_CAPTURE to the options themselves (e.g. "--capture compile-step") to switch.
STEP_CAPTURE=${DIVCO_EVIDENCE_CAPTURE:-auto}
# "S|way": way is undivided (S = 1), batched or per_branch (BranchBatchedNetwork.execution).
RUNS=("1|undivided" "2|batched" "2|per_branch" "4|batched" "4|per_branch")
[[ -n ${DIVCO_EVIDENCE_RUNS:-} ]] && IFS=';' read -r -a RUNS <<< "$DIVCO_EVIDENCE_RUNS"

mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee -a "$OUT_DIR/evidence.log") 2>&1
TEE_PID=$!
cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/divco-evidence.XXXXXX")
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

finish() {
    local status=$?
    trap - EXIT INT TERM
    echo "=== evidence: $(elapsed)s of ${BUDGET}s, exit status $status; files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
    rm -rf "$SCRATCH"
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { echo "gpu_evidence: error: $*"; exit 2; }

# -- the plan ------------------------------------------------------------------------------------
plan_total=$(( DATA_LIMIT + KILL_GRACE + ${#RUNS[@]} * (RUN_LIMIT + KILL_GRACE) ))
echo "=== divco GPU evidence$( ((DRY_RUN)) && echo ' (DRY RUN)' ): $(date -u +%FT%TZ), output $OUT_DIR"
echo "plan: data ${DATA_LIMIT}s + ${#RUNS[@]} runs x ${RUN_LIMIT}s + $(( ${#RUNS[@]} + 1 )) x ${KILL_GRACE}s kill grace" \
     "= ${plan_total}s + ${MARGIN}s margin of a ${BUDGET}s budget"
if (( plan_total + MARGIN > BUDGET )); then
    echo "PLAN DOES NOT FIT: ${plan_total}s + ${MARGIN}s margin > ${BUDGET}s budget"
    exit 3
fi
for entry in "${RUNS[@]}"; do
    IFS='|' read -r S way <<< "$entry"
    [[ $S =~ ^[1-9][0-9]*$ ]] || fail "a run's S must be a positive integer, got '$S' in '$entry'"
    case $way in
        undivided) (( S == 1 )) || fail "the undivided network is S = 1, got '$entry'" ;;
        batched | per_branch) (( S > 1 )) || fail "way $way needs S > 1, got '$entry'" ;;
        *) fail "a run's way must be undivided, batched or per_branch, got '$way' in '$entry'" ;;
    esac
done

if [[ $STEP_CAPTURE == auto ]]; then
    if $PYTHON -m divco train --help 2>/dev/null | grep -q -- '--capture {[^}]*cuda-graph'; then
        STEP_CAPTURE="--capture cuda-graph"
    else
        STEP_CAPTURE="--compile"
    fi
fi
echo "step capture: $STEP_CAPTURE (DIVCO_EVIDENCE_CAPTURE to change)"

data=$DATA
if [[ ! -f $DATA ]]; then
    (( DRY_RUN )) || fail "no CIFAR-10 archive at $DATA; copy it there (mkdir -p .data && cp ../shared/data/cifar10-jpg.tar.xz .data/) and name .data in the device call's carry"
    echo "data: $DATA is absent (the real run refuses to start without it); the options are checked on 'digits'"
    data=digits
else
    echo "data: $DATA ($(du -h "$DATA" | cut -f1))"
fi

# the arguments of one run (one word per line, for the driver below)
run_args() {
    local S=$1 way=$2 out=$3
    printf '%s\n' train --model "$MODEL" --branches "$S" --data "$data" --recipe cifar10 --epochs "$EPOCHS" \
        --batch-size "$BATCH" --device cuda --precision bf16 --channels-last --cache-dir "$SCRATCH/cache" \
        --no-progress --no-tensorboard --keep-checkpoints 1 --out "$out"
    [[ $way == undivided ]] || printf '%s\n' --execution "$way"
    # shellcheck disable=SC2086
    printf '%s\n' $STEP_CAPTURE
}

if (( DRY_RUN )); then
    for entry in "${RUNS[@]}"; do
        IFS='|' read -r S way <<< "$entry"
        run_args "$S" "$way" "$SCRATCH/S$S-$way" > "$SCRATCH/S$S-$way.args"
    done
    # every run's options through divco train's own parser and resolution, in one process
    $PYTHON - "$SCRATCH"/*.args <<'PYEOF' || exit 1
import contextlib, io, json, sys

import torch

from divco.cli import main

failed = 0
for path in sys.argv[1:]:
    argv = open(path).read().split("\n")[:-1] + ["--print-config"]
    if not torch.cuda.is_available():  # a rehearsal on a CPU: --print-config refuses a device that is not here
        argv[argv.index("--device") + 1] = "cpu"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    name = path.rsplit("/", 1)[-1].removesuffix(".args")
    if code != 0:
        failed += 1
        print(f"  {name}: divco train refuses its options (exit {code}): {err.getvalue().strip()[-500:]}")
        continue
    run = json.loads(out.getvalue())
    print(f"  {name}: {run['model']['name']} x{run['model']['branches']}, {run['model']['parameters'] / 1e6:.2f} M "
          f"parameters, {run['epochs']} epochs of {run['steps_per_epoch']} steps, batch {run['batch_size']}, "
          f"execution {run['execution']}, precision {run['precision']}: divco train {' '.join(argv[1:-1])}")
sys.exit(1 if failed else 0)
PYEOF
    echo "DRY RUN OK: ${#RUNS[@]} runs would train"
    exit 0
fi

$PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "needs a CUDA GPU (torch.cuda.is_available() is false)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2

# -- data: decoded once into the cache every run reads ----------------------------------------------
echo "=== data (limit ${DATA_LIMIT}s, $(elapsed)s elapsed) ==="
timeout -s INT -k "$KILL_GRACE" "$DATA_LIMIT" $PYTHON -c "
import sys, time
from divco.data.sources import load_dataset
t = time.perf_counter()
data = load_dataset(sys.argv[1], cache_dir=sys.argv[2])
print(f'decoded {data.name if hasattr(data, \"name\") else sys.argv[1]} in {time.perf_counter() - t:.1f} s')
" "$DATA" "$SCRATCH/cache" || echo "data: not decoded in ${DATA_LIMIT}s (exit $?): each run decodes it"

# -- the runs ----------------------------------------------------------------------------------------
for entry in "${RUNS[@]}"; do
    IFS='|' read -r S way <<< "$entry"
    dir=$SCRATCH/S$S-$way
    run_args "$S" "$way" "$dir" > "$SCRATCH/S$S-$way.args"
    echo "=== S=$S $way (limit ${RUN_LIMIT}s, $(elapsed)s elapsed): divco $(tr '\n' ' ' < "$SCRATCH/S$S-$way.args")"
    t0=$(date +%s)
    # divco train in-process, so that the peak GPU memory of the run can be read after it
    timeout -s INT -k "$KILL_GRACE" "$RUN_LIMIT" $PYTHON - "$SCRATCH/S$S-$way.args" "$dir.peak.json" <<'PYEOF'
import json, sys
import torch
from divco.cli import main

argv = open(sys.argv[1]).read().split("\n")[:-1]
try:
    code = main(argv)
except SystemExit as exit_:
    code = exit_.code
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
with open(sys.argv[2], "w") as f:
    json.dump({"exit": code, "peak_bytes": peak}, f)
sys.exit(code)
PYEOF
    echo "S=$S $way: exit $?, $(( $(date +%s) - t0 ))s"
done

# -- the table ---------------------------------------------------------------------------------------
$PYTHON - "$OUT_DIR" "$SCRATCH" "$MODEL" "$EPOCHS" "$STEP_CAPTURE" "${RUNS[@]}" <<'PYEOF'
import json, sys
from pathlib import Path

out, scratch, model, epochs, capture, runs = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:6], sys.argv[6:]
records = []
for entry in runs:
    S, way = entry.split("|")
    name = f"S{S}-{way}"
    history = []
    metrics = scratch / name / "metrics.jsonl"
    if metrics.exists():
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    peak_file = scratch / f"{name}.peak.json"
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    last = history[-1] if history else {}
    records.append({
        "S": int(S), "way": way, "epochs_done": len(history), "epochs": int(epochs),
        "test_ensemble_acc": last.get("test_ensemble_acc"),
        # the last epoch: the first one holds the capture (a compile, a CUDA-graph recording)
        "images_per_s": last.get("images_per_s"), "epoch_time_s": last.get("epoch_time_s"),
        "peak_memory_gib": None if peak.get("peak_bytes") is None else peak["peak_bytes"] / 2**30,
        "exit": peak.get("exit"),
    })

def cell(value, fmt):
    return "-" if value is None else format(value, fmt)

lines = [f"{model} on CIFAR-10 (JPEG copy), {epochs} epochs, bf16, channels_last, step capture: {capture}", "",
         "| S | way | epochs | test acc (ensemble) % | images/s (last epoch) | peak memory GiB | exit |",
         "|---|---|---|---|---|---|---|"]
for r in records:
    acc = None if r["test_ensemble_acc"] is None else 100 * r["test_ensemble_acc"]
    lines.append(f"| {r['S']} | {r['way']} | {r['epochs_done']}/{r['epochs']} | {cell(acc, '.2f')} | "
                 f"{cell(r['images_per_s'], '.0f')} | {cell(r['peak_memory_gib'], '.2f')} | {cell(r['exit'], '')} |")
table = "\n".join(lines)
(out / "evidence.md").write_text(table + "\n")
(out / "evidence.json").write_text(json.dumps(records, indent=1) + "\n")
print(table)
sys.exit(0 if all(r["epochs_done"] == r["epochs"] and r["exit"] == 0 for r in records) else 1)
PYEOF
