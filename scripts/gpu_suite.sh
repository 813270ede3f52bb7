#!/usr/bin/env bash
# The complete GPU suite in one command, inside a time budget (default 570 s):
#   1. install carried wheels (.whl/, e.g. torch-uncertainty) into a private folder
#   2. build divco in place (pip install --no-build-isolation --no-deps -e .), native
#      CUDA kernels for this card's architecture; falls back to a pure-Python install
#   3. python -m pytest -m gpu
#   4. divco bench --device cuda --out OUT/bench (the rest of the budget)
# Every stage is time-boxed and the suite goes on after a failure; the bench writes
# its results after every comparison, so a stage cut short still leaves its numbers.
#
#   bash scripts/gpu_suite.sh OUT_DIR            # on a machine with a CUDA GPU
#   DIVCO_SUITE_BUDGET=570  total seconds (stages get what is left)
#   DIVCO_SUITE_BENCH_MIN=240  seconds always kept for the benchmarks
#   DIVCO_SUITE_DEVICE=cpu  dry run of the same flow on a CPU (quick, tiny bench)
#   DIVCO_SUITE_SKIP_BUILD=1  use the divco that is already importable
#   DIVCO_SUITE_BENCH_ARGS="--quick"  extra arguments for divco bench
#   DIVCO_SUITE_PYTEST_ARGS="tests/ops"  what pytest -m gpu collects (default: everything)
#
# Output (at most 8 files, 2 folders deep): OUT_DIR/suite.log, OUT_DIR/pytest.log,
# OUT_DIR/bench/{results.json,results.md,train.png,infer.png,profiles.md}.
set -u -o pipefail

OUT_DIR=${1:-${OUT:-gpu-suite-results}}
BUDGET=${DIVCO_SUITE_BUDGET:-570}
BENCH_MIN=${DIVCO_SUITE_BENCH_MIN:-240}  # seconds the earlier stages leave to the benchmarks
DEVICE=${DIVCO_SUITE_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)

mkdir -p "$OUT_DIR/bench"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee -a "$OUT_DIR/suite.log") 2>&1
cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }
SUMMARY=()

# stage NAME CAP_SECONDS RESERVE_SECONDS COMMAND...: run COMMAND for at most
# min(CAP, remaining - RESERVE) seconds (RESERVE is kept for the later stages).
stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$(( $(remaining) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        echo "=== $name: SKIPPED (budget: ${left}s left after reserving ${reserve}s)"
        SUMMARY+=("$name: skipped (time budget)")
        return 99
    fi
    echo "=== $name (limit ${limit}s, $(elapsed)s elapsed) ==="
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@"
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 124 || rc == 137 )); then
        echo "=== $name: TIMED OUT after ${took}s"
        SUMMARY+=("$name: timed out after ${took}s (limit ${limit}s)")
    else
        echo "=== $name: exit $rc after ${took}s"
        SUMMARY+=("$name: exit $rc, ${took}s")
    fi
    return $rc
}

echo "=== divco GPU suite: $(date -u +%FT%TZ), budget ${BUDGET}s, device $DEVICE, output $OUT_DIR"
if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 | head -5
fi
$PYTHON - <<'EOF' 2>&1
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF

# 1. Carried wheels (optional packages that the machine lacks; see bench/README.md).
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    stage wheels 60 $((BENCH_MIN + 120)) $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/divco-suite-site "$REPO"/.whl/*.whl \
        && export PYTHONPATH=/tmp/divco-suite-site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "=== wheels: none carried (.whl/ is empty): Packed-Ensembles will be recorded as skipped"
fi

# 2. Build divco (native extension with CUDA kernels for this card only: faster to compile).
if [[ ${DIVCO_SUITE_SKIP_BUILD:-0} != 1 ]]; then
    if [[ $DEVICE == cuda && -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
        [[ -n $cap ]] && export TORCH_CUDA_ARCH_LIST=$cap
    fi
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS"
    if ! stage build 300 $((BENCH_MIN + 60)) $PYTHON -m pip install --no-index --no-build-isolation --no-deps -e .; then
        echo "native build failed or timed out: installing pure Python (DIVCO_NO_NATIVE=1)"
        stage build-python 90 $((BENCH_MIN + 60)) \
            env DIVCO_NO_NATIVE=1 $PYTHON -m pip install -q --no-index --no-build-isolation --no-deps -e . \
            || export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
$PYTHON -c "import divco, divco.ops; print('divco', divco.__version__, 'from', divco.__file__); \
import torch; print('ops backends:', divco.ops.available_backends(torch.device('$DEVICE')))" 2>&1

# 3. The GPU tests (a JUnit-free log: the counts are its last line).
# shellcheck disable=SC2086
stage pytest-gpu 150 $BENCH_MIN $PYTHON -m pytest -m gpu -q -p no:cacheprovider -rfE ${DIVCO_SUITE_PYTEST_ARGS:-} \
    > "$OUT_DIR/pytest.log" 2>&1
tail -n 25 "$OUT_DIR/pytest.log"

# 4. The benchmarks, with what is left (minus a margin to write the summary).
left=$(( $(remaining) - 20 ))
bench_args=(--device "$DEVICE" --out "$OUT_DIR/bench" --time-budget $(( left > 30 ? left - 15 : 15 )))
if [[ $DEVICE == cpu ]]; then
    bench_args+=(--quick)
fi
# shellcheck disable=SC2206
bench_args+=(${DIVCO_SUITE_BENCH_ARGS:-})
stage bench 600 5 $PYTHON -m divco bench "${bench_args[@]}"

echo
echo "=== summary ($(elapsed)s of ${BUDGET}s)"
printf '  %s\n' "${SUMMARY[@]}"
if [[ -f $OUT_DIR/bench/results.md ]]; then
    # The goals table and the notes: what a reader of the tail needs first.
    awk '/^## Goals/,/^## Training/' "$OUT_DIR/bench/results.md" | head -n 40
fi
ls -la "$OUT_DIR" "$OUT_DIR/bench"
