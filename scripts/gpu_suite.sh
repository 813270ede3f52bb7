#!/usr/bin/env bash
# The GPU suite in one call, inside a fixed time budget (default 360 s, everything included):
#
#   phase    limit + kill grace  what
#   build      70 s + 5 s  a private venv (--system-site-packages; nothing goes into the system
#                          environment, nothing is downloaded); pure-Python divco installed
#                          editable FIRST (seconds), then the native build for this card only: a
#                          build that fails or times out leaves the pure-Python install, and the
#                          tests run with DIVCO_NO_NATIVE=1 (native tests skipped, the build failed)
#   warm       40 s + 5 s  the Triton compile cache (TRITON_CACHE_DIR, shared by every phase)
#                          warmed in parallel: one pytest process per core runs the Triton tests
#                          of tests/ops and tests/native, each on its shard (DIVCO_TILE_SHARD=i/n)
#                          of the GPU profile's fixed cases (tests/tile_shapes.py) and every n-th
#                          fixed test; its results do not count (the kernels phase reruns them)
#   kernels    55 s + 5 s  pytest -m "(gpu or triton) and not inductor" tests/ops tests/native
#   rest       30 s + 5 s  the same markers on every other test folder
#   bench*     95 s + 5 s  the stages of BENCH_STAGES below: divco bench --quick (95 s), the fused
#              20 s + 5 s  BatchNorm rows of bench/bench_batch_norm.py (20 s)
#   (margin    20 s        the summary, the junit merge, slow exits)
#   inductor   what is left  pytest -m "(gpu or triton) and inductor" tests: torch.compile with
#                          Inductor (minutes of compiles on a fresh machine): last, with whatever
#                          time the budget has left (>= 30 s), or planned in with
#                          DIVCO_SUITE_INDUCTOR=1 (its 90 s must then fit: drop the bench stages,
#                          DIVCO_SUITE_BENCH_STAGES=none); DIVCO_SUITE_INDUCTOR=0 never runs it
#
# Every limit plus its kill grace is planned: the sum and the margin fit the budget, or the suite
# refuses to start. The tests run under the GPU hypothesis profile (DIVCO_HYPOTHESIS=gpu: at most
# 8 derandomized examples a test, shapes and flags from a fixed set of tile classes, so that the
# Triton kernels compile a known, bounded set of specialisations: tests/tile_shapes.py).
#
# Every phase is time-boxed (pytest gets SIGINT first, so it still writes its junit report;
# divco bench writes partial results on SIGTERM) and the suite goes on after a failure; the
# summary is printed on every exit (a trap), into suite.log too.
# Everything lands under OUT_DIR, at most 8 files, 2 folders deep (what a lent GPU machine
# sends back): suite.log (the whole console), build.log, junit.xml (the test phases),
# bench/results.json, bench/results.md, bench/train.png, bench/infer.png, bench/profiles.md.
# The last thing printed is a one-screen summary.
# The calls after it: scripts/gpu_evidence.sh (one GPU, CIFAR-10 at S = 1, 2, 4) and, where the
# device tool lends 2+ GPUs, scripts/gpu_branch_parallel.sh (branch-parallel vs DDP under torchrun
# with NCCL, images/s through the real engine; planned, not run yet).
#
#   bash scripts/gpu_suite.sh OUT_DIR              # on a CUDA machine
#   bash scripts/gpu_suite.sh --dry-run OUT_DIR    # CPU rehearsal (CI): builds (pure Python unless
#       DIVCO_SUITE_DRY_BUILD=native), collects the tests each phase would run (Triton tests
#       counted as GPU tests: on a CPU they run interpreted), counts the Triton specialisations
#       of the GPU profile, lists the bench stages' comparisons, checks the plan fits the budget;
#       runs no test, no bench
#
# Environment: PYTHON (default python3), DIVCO_SUITE_BUDGET (default 360),
#   DIVCO_SUITE_VENV (default /tmp/divco-suite-venv), TORCH_CUDA_ARCH_LIST (default: this card's),
#   DIVCO_SUITE_KEEP_VENV=1 (reuse an existing venv: a second call skips its creation),
#   DIVCO_SUITE_SKIP_BUILD=1 (test the divco that PYTHON imports), DIVCO_SUITE_BUILD_BUDGET,
#   DIVCO_SUITE_PYTEST_WORKERS (pytest-xdist workers of the test phases, default 8; 1: none),
#   DIVCO_SUITE_WARM_JOBS (warm-up processes, default: the cores, at most 16; 0: no warm-up),
#   DIVCO_SUITE_WARM_ARGS (the warm-up's pytest paths, default: tests/ops tests/native),
#   DIVCO_SUITE_INDUCTOR (auto, 1 or 0; see above), DIVCO_SUITE_INDUCTOR_ARGS (its pytest
#   arguments, default: tests), TRITON_CACHE_DIR (default
#   /tmp/divco-suite-triton-cache), DIVCO_SUITE_TEST_PHASES / DIVCO_SUITE_BENCH_STAGES (replace
#   the lists below; ';' between entries; "none": no entry).
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
#: seconds between a phase's SIGINT and its KILL (planned for every phase)
KILL_GRACE=5
BUILD_BUDGET=${DIVCO_SUITE_BUILD_BUDGET:-70}
WARM_BUDGET=40
#: the Triton tests the warm-up runs (sharded), and its processes
WARM_ARGS=${DIVCO_SUITE_WARM_ARGS:-tests/ops tests/native}
WARM_JOBS=${DIVCO_SUITE_WARM_JOBS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))}
INDUCTOR=${DIVCO_SUITE_INDUCTOR:-auto}
INDUCTOR_BUDGET=90
#: the least time worth starting the unplanned Inductor phase with
INDUCTOR_MIN=30
INDUCTOR_ARGS=${DIVCO_SUITE_INDUCTOR_ARGS:-tests}
#: what each test phase selects (Triton tests are GPU tests on a GPU; on a CPU they run
#: interpreted and carry only the triton marker: tests/conftest.py)
PHASE_MARKERS="(gpu or triton) and not inductor"
INDUCTOR_MARKERS="(gpu or triton) and inductor"
# Test phases: "name|budget seconds|pytest arguments", in the order they run.
TEST_PHASES=(
    "kernels|55|tests/ops tests/native"
    "rest|30|tests --ignore=tests/ops --ignore=tests/native"
)
# Bench stages: "name|budget seconds|divco bench arguments" (each writes OUT_DIR/bench; a later
# stage's files replace an earlier one's, so give a stage of its own an --out of its own and
# keep the 8-file limit in mind). Hook: the fused BatchNorm op's GPU rows go here.
# An entry whose arguments start with "pytest " runs those pytest-benchmark arguments instead
# (its table lands in suite.log: no file of its own).
BENCH_STAGES=(
    "bench|95|--quick"
    "batchnorm|20|pytest bench/bench_batch_norm.py -k b64-channels_last --benchmark-max-time=0.2 --benchmark-columns=median --benchmark-group-by=group"
)
# Overrides (';'-separated entries of the same form), for rehearsals and tests.
[[ -n ${DIVCO_SUITE_TEST_PHASES:-} ]] && IFS=';' read -r -a TEST_PHASES <<< "$DIVCO_SUITE_TEST_PHASES"
[[ -n ${DIVCO_SUITE_BENCH_STAGES:-} ]] && IFS=';' read -r -a BENCH_STAGES <<< "$DIVCO_SUITE_BENCH_STAGES"
[[ ${DIVCO_SUITE_TEST_PHASES:-} == none ]] && TEST_PHASES=()
[[ ${DIVCO_SUITE_BENCH_STAGES:-} == none ]] && BENCH_STAGES=()
case $INDUCTOR in
    auto | 0) ;;
    1) TEST_PHASES+=("inductor|$INDUCTOR_BUDGET|$INDUCTOR_ARGS") ;;
    *) echo "DIVCO_SUITE_INDUCTOR must be auto, 1 or 0, got '$INDUCTOR'"; exit 2 ;;
esac
(( WARM_JOBS > 0 )) || WARM_BUDGET=0
VENV=${DIVCO_SUITE_VENV:-/tmp/divco-suite-venv}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/divco-suite-triton-cache}
export DIVCO_HYPOTHESIS=gpu
START=$(date +%s)

mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee -a "$OUT_DIR/suite.log") 2>&1
TEE_PID=$!
cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1
# scratch (phase logs, the collected lists): never in OUT_DIR, whose file count is limited
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/divco-suite.XXXXXX")

elapsed() { echo $(( $(date +%s) - START )); }
SUMMARY=()
FAILED=0
junit_files=()

# -- the summary: printed on every exit (a failure, a signal, the end) -------------------------
merge_junit() {
    (( ${#junit_files[@]} )) || return 0
    local present=()
    for f in "${junit_files[@]}"; do [[ -f $f ]] && present+=("$f"); done
    ${PY:-$PYTHON} - "$OUT_DIR/junit.xml" "${present[@]}" <<'PYEOF' 2>&1
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
PYEOF
    rm -f "${junit_files[@]}"
}

finish() {
    local status=$?
    trap - EXIT INT TERM
    merge_junit
    echo
    echo "=== summary: $(elapsed)s of ${BUDGET}s$( ((DRY_RUN)) && echo ' (dry run: nothing was measured)' )"
    (( ${#SUMMARY[@]} )) && printf '  %s\n' "${SUMMARY[@]}"
    if [[ -f $OUT_DIR/bench/results.md ]]; then
        awk '/^## Goals/,/^## Training/' "$OUT_DIR/bench/results.md" | grep -v '^## Training' | head -n 20
    fi
    echo "files: $(cd "$OUT_DIR" && find . -type f | sort | tr '\n' ' ')"
    rm -rf "$SCRATCH"
    if (( status != 0 && status != 1 )); then
        echo "RESULT: FAILED (the suite stopped early, exit status $status)"
    elif (( FAILED || status )); then
        echo "RESULT: FAILED (see above)"
        status=1
    else
        echo "RESULT: OK"
    fi
    # let tee write the last lines into suite.log before the caller reads it
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- the plan and its budget check ---------------------------------------------------------
plan_total=$(( BUILD_BUDGET + KILL_GRACE ))
plan_text="build ${BUILD_BUDGET}s"
phases=1
if (( WARM_BUDGET > 0 )); then
    plan_total=$(( plan_total + WARM_BUDGET + KILL_GRACE )); plan_text+=", warm ${WARM_BUDGET}s"; phases=$(( phases + 1 ))
fi
for entry in "${TEST_PHASES[@]}" "${BENCH_STAGES[@]}"; do
    IFS='|' read -r name seconds _ <<< "$entry"
    plan_total=$(( plan_total + seconds + KILL_GRACE ))
    plan_text+=", $name ${seconds}s"
    phases=$(( phases + 1 ))
done
echo "=== divco GPU suite$( ((DRY_RUN)) && echo ' (DRY RUN)' ): $(date -u +%FT%TZ), output $OUT_DIR"
echo "plan: $plan_text + $phases x ${KILL_GRACE}s kill grace = ${plan_total}s + ${MARGIN}s margin of a ${BUDGET}s budget;" \
     "inductor: $(case $INDUCTOR in 1) echo planned;; 0) echo never;; *) echo "with the time left (>= ${INDUCTOR_MIN}s)";; esac)"
if (( plan_total + MARGIN > BUDGET )); then
    echo "PLAN DOES NOT FIT: ${plan_total}s + ${MARGIN}s margin > ${BUDGET}s budget"
    exit 3
fi

# stage NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (SIGINT first, KILL after the
# grace) and record how it ended. Returns the command's exit status.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, $(elapsed)s elapsed) ==="
    local t0=$(date +%s)
    timeout -s INT -k "$KILL_GRACE" "$limit" "$@"
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 124 || rc == 137 || rc == 130 )) && (( took >= limit )); then
        SUMMARY+=("$(printf '%-9s TIMED OUT after %ss (limit %ss)' "$name" "$took" "$limit")")
        LAST_TIMED_OUT=1
    else
        SUMMARY+=("$(printf '%-9s exit %s, %ss of %ss' "$name" "$rc" "$took" "$limit")")
        LAST_TIMED_OUT=0
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
    # Pure Python first (seconds): whatever happens to the native build below (a failure, the
    # phase's time running out), an importable divco stays installed and the tests run.
    DIVCO_NO_NATIVE=1 "$VENV/bin/python" -m pip install -q --no-index --no-build-isolation --no-deps -e .
    echo "pure-Python divco installed"
    if (( DRY_RUN )) && [[ ${DIVCO_SUITE_DRY_BUILD:-python} != native ]]; then
        return  # CI: a native build here would replace the tree's divco/_C*.so under the running tests
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
        echo "NATIVE BUILD FAILED: reinstalling pure Python (DIVCO_NO_NATIVE=1); native tests are skipped"
        DIVCO_NO_NATIVE=1 "$VENV/bin/python" -m pip install -q --no-index --no-build-isolation --no-deps -e .
        return 1
    fi
}
native_wanted=0
if (( ! DRY_RUN )) || [[ ${DIVCO_SUITE_DRY_BUILD:-python} == native ]]; then
    native_wanted=1
fi
if [[ ${DIVCO_SUITE_SKIP_BUILD:-0} == 1 ]]; then
    echo "build skipped (DIVCO_SUITE_SKIP_BUILD=1): testing the divco $PYTHON imports" | tee "$OUT_DIR/build.log"
    PY=$PYTHON
else
    stage build "$BUILD_BUDGET" bash -c "$(declare -f build); VENV='$VENV' PYTHON='$PYTHON' REPO='$REPO' \
        DRY_RUN=$DRY_RUN build" > "$OUT_DIR/build.log" 2>&1
    build_rc=$?
    tail -n 3 "$OUT_DIR/build.log"
    (( build_rc == 0 )) || FAILED=1
    PY=$VENV/bin/python
    [[ -x $PY ]] || PY=$PYTHON
    if (( native_wanted )) && ! $PY -c "import divco._C" 2>/dev/null; then
        # the build failed or ran out of time: test the pure-Python divco, native tests skipped
        echo "no native extension (build exit $build_rc): the tests run with DIVCO_NO_NATIVE=1"
        export DIVCO_NO_NATIVE=1
        FAILED=1
    fi
fi
if ! $PY -c "import divco, divco.ops, torch; print('divco', divco.__version__, 'from', divco.__file__, '| backends:', \
divco.ops.available_backends(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>&1; then
    echo "divco DOES NOT IMPORT with $PY"
    FAILED=1
fi

# -- tests ------------------------------------------------------------------------------------
# xdist workers: Triton's JIT compiles and the CPU references (float64) overlap; one GPU holds
# them all easily.
workers=()
if (( ! DRY_RUN )) && [[ ${DIVCO_SUITE_PYTEST_WORKERS:-8} -gt 1 ]] && $PY -c "import xdist" 2>/dev/null; then
    workers=(-n "${DIVCO_SUITE_PYTEST_WORKERS:-8}")
fi

# warm JOBS SECONDS: the Triton compile cache, one pytest process per shard, all at once; each
# shard stops itself in time for the report (what it compiled stays in the cache)
warm() {
    local jobs=$1 shard_limit=$(( $2 > 16 ? $2 - 10 : $2 / 2 + 1 )) pids=() i failed=0
    # at the phase's limit every shard gets the SIGINT too: report what was compiled by then
    trap 'echo "warm: stopped at its limit"' INT
    for (( i = 0; i < jobs; i++ )); do
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=1 DIVCO_TILE_SHARD="$i/$jobs" timeout -s INT -k 3 "$shard_limit" \
            $PY -m pytest -q -p no:cacheprovider -p no:xdist \
            -m "triton and not inductor" $WARM_ARGS > "$SCRATCH/warm-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        # a wait that the SIGINT interrupts (status > 128) is waited again: the shard still exits
        while true; do
            wait "${pids[$i]}"
            local rc=$?
            (( rc > 128 )) && kill -0 "${pids[$i]}" 2>/dev/null && continue
            break
        done
        (( rc == 0 )) || failed=$(( failed + 1 ))
    done
    echo "warm: $jobs shards of ${shard_limit}s, $failed with failures or stopped (the kernels phase reports" \
         "the tests);" \
         "$(find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l) compiled kernels in $TRITON_CACHE_DIR"
    tail -n 1 "$SCRATCH"/warm-*.log 2>/dev/null | grep -v '^==> \|^$' | sort | uniq -c | head -5
    return 0
}

# collect NAME MARKERS ARGS...: the tests pytest would run, one line each with its markers
# (tests/conftest.py writes DIVCO_SUITE_COLLECT); prints how many
collect() {
    local name=$1 markers=$2
    shift 2
    export DIVCO_SUITE_COLLECT="$SCRATCH/$name.tsv"
    if ! stage "$name" 300 $PY -m pytest -m "$markers" --collect-only -q -p no:cacheprovider "$@" \
            > "$SCRATCH/$name.txt" 2>&1; then
        tail -n 20 "$SCRATCH/$name.txt"
        FAILED=1
    fi
    unset DIVCO_SUITE_COLLECT
    touch "$SCRATCH/$name.tsv"
}

if (( DRY_RUN )); then
    # What each phase would run, from one collection per phase (collecting on a busy CI CPU is no
    # measure of the GPU phase: a limit of its own). Triton tests count as GPU tests here.
    echo "warm: the GPU hypothesis profile's Triton specialisations (tests/tile_shapes.py):"
    if TRITON_INTERPRET=1 $PY tests/tile_shapes.py > "$SCRATCH/tiles.txt" 2>&1; then
        sed 's/^/    /' "$SCRATCH/tiles.txt"
        SUMMARY+=("$(printf '%-9s %s' warm "$(grep -o '[0-9]* Triton specialisations' "$SCRATCH/tiles.txt") in $WARM_JOBS shards of ${WARM_BUDGET}s")")
    else
        tail -n 20 "$SCRATCH/tiles.txt"
        SUMMARY+=("$(printf '%-9s the specialisations could not be counted' warm)")
        FAILED=1
    fi
    inductor_count=0
    for entry in "${TEST_PHASES[@]}"; do
        IFS='|' read -r name seconds args <<< "$entry"
        [[ $name == inductor ]] && continue
        # shellcheck disable=SC2086
        collect "$name" "gpu or triton" $args
        count=$(awk -F'\t' '$4 == 0' "$SCRATCH/$name.tsv" | wc -l)
        triton=$(awk -F'\t' '$4 == 0 && $3 == 1' "$SCRATCH/$name.tsv" | wc -l)
        inductor=$(awk -F'\t' '$4 == 1' "$SCRATCH/$name.tsv" | wc -l)
        inductor_count=$(( inductor_count + inductor ))
        echo "$name: $count GPU tests would run ($triton of them Triton tests; $inductor Inductor tests left to the inductor phase), in this order (first 5):"
        awk -F'\t' '$4 == 0 {print "    " $1}' "$SCRATCH/$name.tsv" | head -5
        SUMMARY+=("$(printf '%-9s %s GPU tests collected (%s Triton), %s Inductor' "$name" "$count" "$triton" "$inductor")")
        if (( count == 0 )); then
            echo "no GPU tests collected in phase $name"
            FAILED=1
        fi
    done
    echo "inductor: $inductor_count Inductor GPU tests would run ($INDUCTOR)"
    SUMMARY+=("$(printf '%-9s %s Inductor GPU tests (%s)' inductor "$inductor_count" "$INDUCTOR")")
else
    if (( WARM_BUDGET > 0 )); then
        stage warm "$WARM_BUDGET" bash -c "$(declare -f warm); PY='$PY' SCRATCH='$SCRATCH' WARM_ARGS='$WARM_ARGS' \
            warm $WARM_JOBS $WARM_BUDGET"
    fi
    run_tests() {
        local name=$1 seconds=$2 markers=$3
        shift 3
        stage "$name" "$seconds" $PY -m pytest -m "$markers" -q -p no:cacheprovider -rfE "${workers[@]}" \
            --junitxml="$OUT_DIR/.junit-$name.xml" -o junit_suite_name="$name" "$@"
        local rc=$?
        junit_files+=("$OUT_DIR/.junit-$name.xml")
        (( rc == 0 )) || FAILED=1
    }
    for entry in "${TEST_PHASES[@]}"; do
        IFS='|' read -r name seconds args <<< "$entry"
        markers=$PHASE_MARKERS
        [[ $name == inductor ]] && markers=$INDUCTOR_MARKERS
        # shellcheck disable=SC2086
        run_tests "$name" "$seconds" "$markers" $args
    done
fi

# -- benchmarks -------------------------------------------------------------------------------
for entry in "${BENCH_STAGES[@]}"; do
    IFS='|' read -r name seconds args <<< "$entry"
    if [[ $args == "pytest "* ]]; then
        # pytest-benchmark rows (the fused BatchNorm op); no spaces inside an argument
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
            stage "$name" "$seconds" $PY -m pytest -q -p no:cacheprovider "${pytest_args[@]}" || FAILED=1
        fi
        continue
    fi
    # shellcheck disable=SC2086
    if (( DRY_RUN )); then
        echo "$name: divco bench --device cuda $args would run:"
        $PY -m divco bench --device cuda --out "$OUT_DIR/bench" --dry-run $args 2>&1 | sed 's/^/    /' \
            | tee "$SCRATCH/bench-plan.txt"
        estimate=$(awk -F'[(~]' '/\(~[0-9]+ s\)$/ {sum += $NF + 0} END {print sum + 0}' "$SCRATCH/bench-plan.txt")
        SUMMARY+=("$(printf '%-9s plan estimate ~%ss of %ss' "$name" "${estimate:-0}" "$seconds")")
        if (( ${estimate:-0} > seconds )); then
            echo "bench stage $name: its plan (~${estimate}s) does not fit its ${seconds}s"
            FAILED=1
        fi
    else
        # the budget the bench itself plans with: the stage's, less time to write its files
        stage "$name" "$seconds" $PY -m divco bench --device cuda --out "$OUT_DIR/bench" \
            --time-budget $(( seconds - 10 )) $args || FAILED=1
    fi
done

# -- the Inductor tests, with the time left ----------------------------------------------------
if (( ! DRY_RUN )) && [[ $INDUCTOR == auto ]]; then
    left=$(( BUDGET - MARGIN - KILL_GRACE - $(elapsed) ))
    if (( left >= INDUCTOR_MIN )); then
        # shellcheck disable=SC2086
        run_tests inductor "$left" "$INDUCTOR_MARKERS" $INDUCTOR_ARGS
    else
        SUMMARY+=("$(printf '%-9s not run: %ss left of the budget (DIVCO_SUITE_INDUCTOR=1 plans it in)' inductor "$left")")
    fi
fi
exit 0
