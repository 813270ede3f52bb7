"""scripts/gpu_suite.sh on the CPU: the --dry-run rehearsal CI runs (build, the GPU tests
collected in the order they would run, the bench plan, the budget check), and the real flow's
time boxes and outputs when phases fail or time out."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_suite.sh"
#: What a lent GPU machine sends back from OUT: at most 8 files, at most 2 folders down.
MAX_FILES = 8

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _run(out: Path, *args: str, timeout: int = 600, **env_overrides) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "TRITON_INTERPRET")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **env_overrides)
    done = subprocess.run(["bash", str(SCRIPT), *args, str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return done.returncode, done.stdout + done.stderr


def _files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


PLAN = re.compile(r"plan: build (\d+)s, warm (\d+)s, kernels (\d+)s, rest (\d+)s, bench (\d+)s, batchnorm (\d+)s "
                  r"\+ (\d+) x (\d+)s kill grace = (\d+)s \+ (\d+)s margin of a (\d+)s budget")


@pytest.mark.slow
def test_dry_run_builds_collects_in_order_and_fits_the_budget(tmp_path):
    out = tmp_path / "out"
    code, log = _run(out, "--dry-run", DIVCO_SUITE_VENV=str(tmp_path / "venv"))
    assert code == 0, log
    plan = PLAN.search(log)
    assert plan, log
    limits = [int(plan[i]) for i in range(1, 7)]
    phases, grace, total, margin, budget = (int(plan[i]) for i in range(7, 12))
    assert phases == len(limits) and grace > 0
    assert total == sum(limits) + phases * grace, "every limit and its kill grace are planned"
    assert total + margin <= budget <= 360, "the whole call must fit in 6 minutes"
    assert re.search(r"build\s+exit 0", log), log  # the venv and the editable install
    assert "pure-Python divco installed" in log
    assert (tmp_path / "venv" / "bin" / "python").exists()
    # the warm-up's plan: the GPU profile's bounded Triton specialisations
    assert re.search(r"warm\s+\d+ Triton specialisations in \d+ shards", log), log
    # the kernel tests come first, from tests/ops and tests/native only; the rest after
    kernels = re.search(r"kernels: (\d+) GPU tests would run \((\d+) of them Triton tests; (\d+) Inductor.*?\n((?:    .*\n)+)",
                        log)
    rest = re.search(r"rest: (\d+) GPU tests would run \((\d+) of them Triton tests; (\d+) Inductor.*?\n((?:    .*\n)+)", log)
    assert kernels and rest and log.index("kernels: ") < log.index("rest: "), log
    assert int(kernels[1]) > 0 and int(rest[1]) > 0
    # on a CPU the Triton tests run interpreted, unmarked gpu: the dry run counts them as a GPU would
    assert int(kernels[2]) > 50, "the Triton tests are counted as GPU tests"
    assert int(kernels[1]) > 250, "a GPU runs about 320 tests in the kernels phase"
    assert all(line.strip().startswith(("tests/ops/", "tests/native/")) for line in kernels[4].splitlines())
    assert not any(line.strip().startswith(("tests/ops/", "tests/native/")) for line in rest[4].splitlines())
    inductor = re.search(r"inductor: (\d+) Inductor GPU tests would run \(auto\)", log)
    assert inductor and int(inductor[1]) == int(kernels[3]) + int(rest[3]) > 0, log
    assert re.search(r"bench\s+plan estimate ~\d+s of \d+s", log), log
    assert "wide_resnet16_8/S4/train/" in log  # the bench stage's comparisons are listed
    assert re.search(r"batchnorm\s+\d+ benchmarks collected", log), log  # the fused BatchNorm rows
    assert log.rstrip().endswith("RESULT: OK"), log[-2000:]
    assert {p.name for p in _files(out)} == {"suite.log", "build.log"}
    assert "=== summary" in (out / "suite.log").read_text()


def test_a_plan_over_budget_is_refused_before_anything_runs(tmp_path):
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_SUITE_BUDGET="200", timeout=60)
    assert code == 3 and "PLAN DOES NOT FIT" in log, log
    assert "=== build" not in log
    assert "RESULT: FAILED" in (tmp_path / "out" / "suite.log").read_text()  # the summary, from the exit trap


def test_the_kill_graces_count_against_the_budget(tmp_path):
    """Limits that fit alone but not with a grace after each are refused."""
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_SUITE_BUDGET="360", DIVCO_SUITE_BUILD_BUDGET="95",
                     timeout=60)
    assert code == 3 and re.search(r"\+ 6 x 5s kill grace = 365s", log), log


def test_planning_the_inductor_phase_in_needs_room_for_it(tmp_path):
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_SUITE_INDUCTOR="1", timeout=60)
    assert code == 3 and "inductor 90s" in log and "PLAN DOES NOT FIT" in log, log


@pytest.mark.slow
def test_failing_and_timed_out_phases_still_leave_every_output(tmp_path):
    """The real (non-dry) flow on the CPU: a phase that times out, a phase whose pytest finds
    no GPU test, a bench that fails (no CUDA), the Inductor phase with the time left: the suite
    goes on, writes its files, says so."""
    out = tmp_path / "out"
    code, log = _run(
        out, timeout=300, DIVCO_SUITE_SKIP_BUILD="1", DIVCO_SUITE_PYTEST_WORKERS="1", DIVCO_SUITE_WARM_JOBS="0",
        DIVCO_SUITE_TEST_PHASES="kernels|1|tests/ops;rest|120|tests/native/test_ptxas.py",
        DIVCO_SUITE_BENCH_STAGES="bench|60|--quick --no-ops", DIVCO_SUITE_INDUCTOR_ARGS="tests/native/test_ptxas.py")
    assert code == 1, log
    assert re.search(r"kernels\s+TIMED OUT after \d+s \(limit 1s\)", log), log
    assert re.search(r"rest\s+exit 5", log), log  # no GPU test collected there: a failure
    assert re.search(r"bench\s+exit 2", log) and "no CUDA device" in log, log
    # the unplanned Inductor phase ran with what the budget had left
    limit = re.search(r"=== inductor \(limit (\d+)s, (\d+)s elapsed\)", log)
    assert limit and int(limit[1]) + int(limit[2]) <= 360 - 20 - 5, log
    assert re.search(r"inductor\s+exit 5", log), log
    summary = log[log.index("=== summary"):]
    assert "RESULT: FAILED" in summary and "files: " in summary
    names = {p.relative_to(out).as_posix() for p in _files(out)}
    assert {"suite.log", "build.log", "junit.xml"} <= names, names
    assert len(names) <= MAX_FILES and all(n.count("/") <= 2 for n in names)
    junit = (out / "junit.xml").read_text()
    assert 'name="inductor"' in junit and 'name="rest"' in junit
    assert "=== summary" in (out / "suite.log").read_text()


def test_the_summary_reaches_suite_log_when_the_suite_is_stopped(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "TRITON_INTERPRET")}
    env.update(PYTHON=sys.executable, DIVCO_SUITE_SKIP_BUILD="1", DIVCO_SUITE_WARM_JOBS="0",
               DIVCO_SUITE_TEST_PHASES="kernels|4|tests/native/test_ptxas.py", DIVCO_SUITE_BENCH_STAGES="none",
               DIVCO_SUITE_INDUCTOR="0")
    suite = subprocess.Popen(["bash", str(SCRIPT), str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    log = out / "suite.log"
    for _ in range(600):
        if log.exists() and "=== kernels" in log.read_text():
            break
        time.sleep(0.1)
    suite.send_signal(signal.SIGTERM)
    console, _ = suite.communicate(timeout=60)
    assert suite.returncode == 143, console
    text = log.read_text()
    assert "=== summary" in text and "RESULT: FAILED (the suite stopped early, exit status 143)" in text, text


@pytest.mark.slow
def test_a_build_that_runs_out_of_time_leaves_an_importable_pure_python_divco(tmp_path):
    """The native build is stopped at its limit: the pure-Python install made before it stays,
    the tests run with DIVCO_NO_NATIVE=1. (In a copy of the tree: the native build writes there.)"""
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "TRITON_INTERPRET", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", DIVCO_SUITE_VENV=str(tmp_path / "venv"),
               DIVCO_SUITE_DRY_BUILD="native", DIVCO_SUITE_BUILD_BUDGET="25", MAX_JOBS="1",
               DIVCO_SUITE_TEST_PHASES="kernels|30|tests/native/test_ptxas.py", DIVCO_SUITE_BENCH_STAGES="none")
    done = subprocess.run(["bash", str(tree / "scripts" / "gpu_suite.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tree)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    assert "pure-Python divco installed" in (out / "build.log").read_text(), log
    assert re.search(r"build\s+(TIMED OUT|exit [1-9])", log), log
    assert "the tests run with DIVCO_NO_NATIVE=1" in log, log
    assert re.search(rf"divco \S+ from {re.escape(str(tree))}/divco/__init__.py", log), log  # it imports
    assert "kernels: " in log and "RESULT: FAILED" in log
