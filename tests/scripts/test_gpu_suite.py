"""scripts/gpu_suite.sh on the CPU: the --dry-run rehearsal CI runs (build, the GPU tests
collected in the order they would run, the bench plan, the budget check), and the real flow's
time boxes and outputs when phases fail or time out."""

import os
import re
import shutil
import subprocess
import sys
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


@pytest.mark.slow
def test_dry_run_builds_collects_in_order_and_fits_the_budget(tmp_path):
    out = tmp_path / "out"
    code, log = _run(out, "--dry-run", DIVCO_SUITE_VENV=str(tmp_path / "venv"))
    assert code == 0, log
    plan = re.search(r"plan: build (\d+)s, kernels, rest, bench, batchnorm = (\d+)s \+ (\d+)s margin of a (\d+)s budget", log)
    assert plan, log
    assert int(plan[2]) + int(plan[3]) <= int(plan[4]) <= 360, "the whole call must fit in 6 minutes"
    assert re.search(r"build\s+exit 0", log), log  # the venv and the editable install
    assert (tmp_path / "venv" / "bin" / "python").exists()
    # the kernel tests come first, from tests/ops and tests/native only; the rest after
    kernels = re.search(r"kernels: (\d+) GPU tests would run.*?\n((?:    .*\n)+)", log)
    rest = re.search(r"rest: (\d+) GPU tests would run.*?\n((?:    .*\n)+)", log)
    assert kernels and rest and log.index("kernels: ") < log.index("rest: "), log
    assert int(kernels[1]) > 0 and int(rest[1]) > 0
    assert all(line.strip().startswith(("tests/ops/", "tests/native/")) for line in kernels[2].splitlines())
    assert not any(line.strip().startswith(("tests/ops/", "tests/native/")) for line in rest[2].splitlines())
    assert re.search(r"bench\s+plan estimate ~\d+s of \d+s", log), log
    assert "wide_resnet16_8/S4/train/" in log  # the bench stage's comparisons are listed
    assert re.search(r"batchnorm\s+\d+ benchmarks collected", log), log  # the fused BatchNorm rows (issue 12)
    assert log.rstrip().endswith("RESULT: OK"), log[-2000:]
    assert {p.name for p in _files(out)} == {"suite.log", "build.log"}


def test_a_plan_over_budget_is_refused_before_anything_runs(tmp_path):
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_SUITE_BUDGET="200", timeout=60)
    assert code == 3 and "PLAN DOES NOT FIT" in log, log
    assert "=== build" not in log


@pytest.mark.slow
def test_failing_and_timed_out_phases_still_leave_every_output(tmp_path):
    """The real (non-dry) flow on the CPU: a phase that times out, a phase whose pytest finds
    no GPU test, a bench that fails (no CUDA): the suite goes on, writes its files, says so."""
    out = tmp_path / "out"
    code, log = _run(
        out, timeout=300, DIVCO_SUITE_SKIP_BUILD="1", DIVCO_SUITE_PYTEST_WORKERS="1",
        DIVCO_SUITE_TEST_PHASES="kernels|1|tests/ops;rest|120|tests/native/test_ptxas.py",
        DIVCO_SUITE_BENCH_STAGES="bench|60|--quick --no-ops")
    assert code == 1, log
    assert re.search(r"kernels\s+TIMED OUT after \d+s \(limit 1s\)", log), log
    assert re.search(r"rest\s+exit 5", log), log  # no GPU test collected there: a failure
    assert re.search(r"bench\s+exit 2", log) and "no CUDA device" in log, log
    summary = log[log.index("=== summary"):]
    assert "RESULT: FAILED" in summary and "files: " in summary
    names = {p.relative_to(out).as_posix() for p in _files(out)}
    assert {"suite.log", "build.log", "junit.xml"} <= names, names
    assert len(names) <= MAX_FILES and all(n.count("/") <= 2 for n in names)
    assert "<testsuite" in (out / "junit.xml").read_text()
    assert "=== summary" in (out / "suite.log").read_text()
