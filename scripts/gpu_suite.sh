#!/usr/bin/env bash
# The GPU suite in one call, inside a fixed time budget (default 360 s, the build included):
#
#   phase    budget  what
#   build      120 s  a private venv (--system-site-packages; nothing goes into the system
#                     environment, nothing is downloaded), divco installed editable into it with
#                     the CUDA kernels for this card only; falls back to pure Python (logged)
#   kernels     60 s  pytest -m gpu tests/ops tests/native       (the fused kernels first)
#   rest        30 s  pytest -m gpu on every other test folder
#   bench*     130 s  the stages of BENCH_STAGES below: divco bench --quick (100 s), the fused
#                     BatchNorm rows of bench/bench_batch_norm.py (30 s)
#   (margin     20 s  the summary, the junit merge, slow exits)
#
# Every phase is time-boxed (pytest gets SIGINT first, so it still writes its junit report;
# divco bench writes partial results on SIGTERM) and the suite goes on after a failure.
# Everything lands under OUT_DIR, at most 8 files, 2 folders deep (what a lent GPU machine
# sends back): suite.log (the whole console), build.log, junit.xml (both test phases),
# bench/results.json, bench/results.md, bench/train.png, bench/infer.png, bench/profiles.md.
# The last thing printed is a one-screen summary.
#
#   bash scripts/gpu_suite.sh OUT_DIR              # on a CUDA machine
#   bash scripts/gpu_suite.sh --dry-run OUT_DIR    # CPU rehearsal (CI): builds (pure Python unless
#       DIVCO_SUITE_DRY_BUILD=native), collects the GPU tests in the order they would run, lists
#       the bench stages' comparisons, checks the plan fits the budget; runs no test, no bench
#
# Environment: PYTHON (default python3), DIVCO_SUITE_BUDGET (default 360),
#   DIVCO_SUITE_VENV (default /tmp/divco-suite-venv), TORCH_CUDA_ARCH_LIST (default: this card's),
#   DIVCO_SUITE_KEEP_VENV=1 (reuse an existing venv: a second call skips its creation),
#   DIVCO_SUITE_SKIP_BUILD=1 (test the divco that PYTHON imports), DIVCO_SUITE_BUILD_BUDGET,
#   DIVCO_SUITE_PYTEST_WORKERS (pytest-xdist workers of the test phases, default 4; 1: none),
#   DIVCO_SUITE_TEST_PHASES / DIVCO_SUITE_BENCH_STAGES (replace the lists below; ';' between entries).
set -u -o pipefail

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
OUT_DIR=${1:-${OUT:-gpu-suite-results}}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUDGET=${DIVCO_SUITE_BUDGET:-360}
MARGIN=20
BUILD_BUDGET=${DIVCO_SUITE_BUILD_BUDGET:-120}
# Test phases: "name|budget seconds|pytest arguments", in the order they run.
TEST_PHASES=(
    "kernels|60|tests/ops tests/native"
    "rest|30|tests --ignore=tests/ops --ignore=tests/native"
)
# Bench stages: "name|budget seconds|divco bench arguments" (each writes OUT_DIR/bench; a later
# stage's files replace an earlier one's, so give a stage of its own an --out of its own and
# keep the 8-file limit in mind). Hook: the fused BatchNorm op's GPU rows (issue 12) go here.
# An entry whose arguments start with "pytest " runs those pytest-benchmark arguments instead
# (its table lands in suite.log: no file of its own).
BENCH_STAGES=(
    "bench|100|--quick"
    "batchnorm|30|pytest bench/bench_batch_norm.py -k b64-channels_last --benchmark-max-time=0.2 --benchmark-columns=median --benchmark-group-by=group"
)
# Overrides (';'-separated entries of the same form), for rehearsals and tests.
[[ -n ${DIVCO_SUITE_TEST_PHASES:-} ]] && IFS=';' read -r -a TEST_PHASES <<< "$DIVCO_SUITE_TEST_PHASES"
[[ -n ${DIVCO_SUITE_BENCH_STAGES:-} ]] && IFS=';' read -r -a BENCH_STAGES <<< "$DIVCO_SUITE_BENCH_STAGES"
VENV=${DIVCO_SUITE_VENV:-/tmp/divco-suite-venv}
START=$(date +%s)

mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee -a "$OUT_DIR/suite.log") 2>&1
cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
SUMMARY=()
FAILED=0

# -- the plan and its budget check ---------------------------------------------------------
plan_total=$BUILD_BUDGET
for entry in "${TEST_PHASES[@]}" "${BENCH_STAGES[@]}"; do
    IFS='|' read -r _ seconds _ <<< "$entry"
    plan_total=$(( plan_total + seconds ))
done
echo "=== divco GPU suite$( ((DRY_RUN)) && echo ' (DRY RUN)' ): $(date -u +%FT%TZ), output $OUT_DIR"
echo "plan: build ${BUILD_BUDGET}s$(printf ', %s' "${TEST_PHASES[@]%%|*}" "${BENCH_STAGES[@]%%|*}") = ${plan_total}s + ${MARGIN}s margin of a ${BUDGET}s budget"
if (( plan_total + MARGIN > BUDGET )); then
    echo "PLAN DOES NOT FIT: ${plan_total}s + ${MARGIN}s margin > ${BUDGET}s budget"
    exit 3
fi

# stage NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (SIGINT first, then KILL)
# and record how it ended. Returns the command's exit status.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, $(elapsed)s elapsed) ==="
    local t0=$(date +%s)
    timeout -s INT -k 15 "$limit" "$@"
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 124 || rc == 137 || rc == 130 )) && (( took >= limit )); then
        SUMMARY+=("$(printf '%-9s TIMED OUT after %ss (limit %ss)' "$name" "$took" "$limit")")
        FAILED=1
    else
        SUMMARY+=("$(printf '%-9s exit %s, %ss of %ss' "$name" "$rc" "$took" "$limit")")
        (( rc == 0 )) || FAILED=1
    fi
    return $rc
}

# -- machine ---------------------------------------------------------------------------------
if (( ! DRY_RUN )); then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | head -4
fi
$PYTHON -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__, \
'(CUDA', torch.version.cuda, ') | GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1

# -- build: a private venv that sees the system's packages, divco editable in it ------------
build() {
    set -e
    if [[ ${DIVCO_SUITE_KEEP_VENV:-0} != 1 || ! -x $VENV/bin/python ]]; then
        rm -rf "$VENV"
        $PYTHON -m venv --without-pip --system-site-packages "$VENV"
        # A venv made from a venv (the GPU image's python3 is one) sees the BASE interpreter's
        # site-packages, not torch's: add the calling interpreter's own, .pth files included.
        local site
        site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        $PYTHON -c 'import site, sys; print("\n".join(f"import site; site.addsitedir({p!r})" for p in
            site.getsitepackages() + [site.getusersitepackages()]))' > "$site/_divco_suite_parent.pth"
    fi
    if [[ -d $REPO/.whl ]] && compgen -G "$REPO/.whl/*.whl" > /dev/null; then
        echo "carried wheels: $(ls "$REPO"/.whl)"
        "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile "$REPO"/.whl/*.whl
    fi
    if (( DRY_RUN )) && [[ ${DIVCO_SUITE_DRY_BUILD:-python} != native ]]; then
        # CI: a native build here would replace the tree's divco/_C*.so under the running tests
        DIVCO_NO_NATIVE=1 "$VENV/bin/python" -m pip install -q --no-index --no-build-isolation --no-deps -e .
        return
    fi
    if [[ $DRY_RUN == 0 && -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
        local cap
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
        [[ -n $cap ]] && export TORCH_CUDA_ARCH_LIST=$cap
    fi
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # ninja and nvcc wrappers beside the calling interpreter (its venv's bin) stay on PATH
    PATH="$(dirname "$($PYTHON -c 'import sys; print(sys.executable)')"):$PATH"
    echo "native build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS"
    if ! "$VENV/bin/python" -m pip install -v --no-index --no-build-isolation --no-deps -e .; then
        echo "NATIVE BUILD FAILED: installing pure Python (DIVCO_NO_NATIVE=1); native tests will fail"
        DIVCO_NO_NATIVE=1 "$VENV/bin/python" -m pip install -q --no-index --no-build-isolation --no-deps -e .
        return 1
    fi
}
if [[ ${DIVCO_SUITE_SKIP_BUILD:-0} == 1 ]]; then
    echo "build skipped (DIVCO_SUITE_SKIP_BUILD=1): testing the divco $PYTHON imports" | tee "$OUT_DIR/build.log"
    PY=$PYTHON
else
    stage build "$BUILD_BUDGET" bash -c "$(declare -f build); VENV='$VENV' PYTHON='$PYTHON' REPO='$REPO' \
        DRY_RUN=$DRY_RUN build" > "$OUT_DIR/build.log" 2>&1
    tail -n 3 "$OUT_DIR/build.log"
    PY=$VENV/bin/python
    [[ -x $PY ]] || PY=$PYTHON
fi
$PY -c "import divco, divco.ops, torch; print('divco', divco.__version__, 'from', divco.__file__, '| backends:', \
divco.ops.available_backends(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>&1

# -- tests ------------------------------------------------------------------------------------
junit_files=()
# A few workers: Triton's JIT compiles (a CPU matter, seconds per specialisation) overlap;
# one GPU holds them all easily.
workers=()
if (( ! DRY_RUN )) && [[ ${DIVCO_SUITE_PYTEST_WORKERS:-4} -gt 1 ]] && $PY -c "import xdist" 2>/dev/null; then
    workers=(-n "${DIVCO_SUITE_PYTEST_WORKERS:-4}")
fi
for entry in "${TEST_PHASES[@]}"; do
    IFS='|' read -r name seconds args <<< "$entry"
    # shellcheck disable=SC2086
    if (( DRY_RUN )); then
        # collecting on a busy CI CPU is no measure of the GPU phase: a limit of its own
        stage "$name" 300 $PY -m pytest -m gpu --collect-only -q -p no:cacheprovider $args \
            > "$OUT_DIR/.collect-$name.txt" 2>&1
        count=$(grep -c '::' "$OUT_DIR/.collect-$name.txt")
        echo "$name: $count GPU tests would run, in this order (first 5):"
        grep '::' "$OUT_DIR/.collect-$name.txt" | head -5 | sed 's/^/    /'
        SUMMARY+=("$(printf '%-9s %s GPU tests collected' "$name" "$count")")
        if (( count == 0 )); then
            echo "no GPU tests collected in phase $name"
            FAILED=1
        fi
        rm -f "$OUT_DIR/.collect-$name.txt"
    else
        stage "$name" "$seconds" $PY -m pytest -m gpu -q -p no:cacheprovider -rfE "${workers[@]}" \
            --junitxml="$OUT_DIR/.junit-$name.xml" -o junit_suite_name="$name" $args
        junit_files+=("$OUT_DIR/.junit-$name.xml")
    fi
done

# -- benchmarks -------------------------------------------------------------------------------
for entry in "${BENCH_STAGES[@]}"; do
    IFS='|' read -r name seconds args <<< "$entry"
    if [[ $args == "pytest "* ]]; then
        # pytest-benchmark rows (the fused BatchNorm op, issue 12); no spaces inside an argument
        read -r -a pytest_args <<< "${args#pytest }"
        if (( DRY_RUN )); then
            count=$($PY -m pytest --collect-only -q -p no:cacheprovider "${pytest_args[@]}" 2>/dev/null | grep -c '::')
            echo "$name: $count benchmarks would run (pytest ${pytest_args[*]})"
            SUMMARY+=("$(printf '%-9s %s benchmarks collected for %ss' "$name" "$count" "$seconds")")
            if (( count == 0 )); then
                echo "bench stage $name: no benchmark collected"
                FAILED=1
            fi
        else
            stage "$name" "$seconds" $PY -m pytest -q -p no:cacheprovider "${pytest_args[@]}"
        fi
        continue
    fi
    # shellcheck disable=SC2086
    if (( DRY_RUN )); then
        echo "$name: divco bench --device cuda $args would run:"
        $PY -m divco bench --device cuda --out "$OUT_DIR/bench" --dry-run $args 2>&1 | sed 's/^/    /' \
            | tee "$OUT_DIR/.bench-plan.txt"
        estimate=$(awk -F'[(~]' '/\(~[0-9]+ s\)$/ {sum += $NF + 0} END {print sum + 0}' "$OUT_DIR/.bench-plan.txt")
        rm -f "$OUT_DIR/.bench-plan.txt"
        SUMMARY+=("$(printf '%-9s plan estimate ~%ss of %ss' "$name" "${estimate:-0}" "$seconds")")
        if (( ${estimate:-0} > seconds )); then
            echo "bench stage $name: its plan (~${estimate}s) does not fit its ${seconds}s"
            FAILED=1
        fi
    else
        # the budget the bench itself plans with: the stage's, less time to write its files
        stage "$name" "$seconds" $PY -m divco bench --device cuda --out "$OUT_DIR/bench" \
            --time-budget $(( seconds - 10 )) $args
    fi
done

# -- summary ----------------------------------------------------------------------------------
if (( ${#junit_files[@]} )); then
    $PY - "$OUT_DIR/junit.xml" "${junit_files[@]}" <<'EOF' 2>&1
import sys, xml.etree.ElementTree as ET
merged = ET.Element("testsuites")
for path in sys.argv[2:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        print(f"junit: {path}: {error}")
        continue
    merged.extend(root.iter("testsuite"))
ET.ElementTree(merged).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
print("tests:")
for suite in merged:
    a = suite.attrib
    print(f"  {a.get('name')}: {a.get('tests')} tests, {a.get('failures')} failed, {a.get('errors')} errors, "
          f"{a.get('skipped')} skipped, {float(a.get('time', 0)):.0f}s")
    bad = [c for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    for case in bad[:8]:
        print(f"    FAILED {case.get('classname')}::{case.get('name')}")
    if len(bad) > 8:
        print(f"    ... and {len(bad) - 8} more")
EOF
    rm -f "${junit_files[@]}"
fi
echo
echo "=== summary: $(elapsed)s of ${BUDGET}s$( ((DRY_RUN)) && echo ' (dry run: nothing was measured)' )"
printf '  %s\n' "${SUMMARY[@]}"
if [[ -f $OUT_DIR/bench/results.md ]]; then
    awk '/^## Goals/,/^## Training/' "$OUT_DIR/bench/results.md" | grep -v '^## Training' | head -n 20
fi
echo "files: $(cd "$OUT_DIR" && find . -type f | sort | tr '\n' ' ')"
if (( FAILED )); then
    echo "RESULT: FAILED (see above)"
    exit 1
fi
echo "RESULT: OK"
