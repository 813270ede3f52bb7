"""scripts/gpu_evidence.sh on the CPU: the --dry-run rehearsal (the plan within 5 minutes, every
run's options resolved by divco train itself), and the refusals before anything trains."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from optional_deps import needs_torchvision

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_evidence.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _run(out: Path, *args: str, timeout: int = 300, **env_overrides) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "TRITON_INTERPRET")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **env_overrides)
    done = subprocess.run(["bash", str(SCRIPT), *args, str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return done.returncode, done.stdout + done.stderr


@needs_torchvision
@pytest.mark.slow
def test_dry_run_resolves_every_run_within_five_minutes(tmp_path):
    out = tmp_path / "out"
    code, log = _run(out, "--dry-run", DIVCO_EVIDENCE_DATA=str(tmp_path / "absent.tar.xz"))
    assert code == 0, log
    plan = re.search(r"plan: data (\d+)s \+ (\d+) runs x (\d+)s \+ (\d+) x (\d+)s kill grace = (\d+)s "
                     r"\+ (\d+)s margin of a (\d+)s budget", log)
    assert plan, log
    data, runs, limit, graces, grace, total, margin, budget = map(int, plan.groups())
    assert total == data + runs * limit + graces * grace and graces == runs + 1
    assert total + margin <= budget <= 300, "the evidence call must fit in 5 minutes"
    assert "is absent (the real run refuses to start without it)" in log
    assert re.search(r"step capture: (--compile|--capture \S+)", log), log
    resolved = re.findall(r"  S(\d)-(\w+): wide_resnet16_8 x(\d), [\d.]+ M parameters, 3 epochs of \d+ steps, "
                          r"batch 128, execution (\w+), precision \{'setting': 'bf16'.*--channels-last", log)
    assert [(s, way, execution) for s, way, _, execution in resolved] == [
        ("1", "undivided", "auto"), ("2", "batched", "batched"), ("2", "per_branch", "per_branch"),
        ("4", "batched", "batched"), ("4", "per_branch", "per_branch")], log
    assert all(s == branches for s, _, branches, _ in resolved)
    assert "DRY RUN OK: 5 runs would train" in log
    assert "=== evidence:" in (out / "evidence.log").read_text()


def test_a_run_divco_train_refuses_fails_the_dry_run(tmp_path):
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_EVIDENCE_DATA=str(tmp_path / "absent.tar.xz"),
                     DIVCO_EVIDENCE_RUNS="2|batched", DIVCO_EVIDENCE_MODEL="no_such_model")
    assert code == 1 and "S2-batched: divco train refuses its options" in log, log


@pytest.mark.parametrize("runs, message", [
    ("1|batched", "way batched needs S > 1"),
    ("2|undivided", "the undivided network is S = 1"),
    ("x|batched", "S must be a positive integer"),
    ("2|sideways", "way must be undivided, batched or per_branch"),
])
def test_bad_runs_are_refused_before_anything_runs(tmp_path, runs, message):
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_EVIDENCE_RUNS=runs, timeout=60)
    assert code == 2 and message in log, log


def test_the_plan_must_fit_the_budget(tmp_path):
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_EVIDENCE_RUN_LIMIT="60", timeout=60)
    assert code == 3 and "PLAN DOES NOT FIT" in log, log


def test_the_real_run_needs_the_archive(tmp_path):
    code, log = _run(tmp_path / "out", DIVCO_EVIDENCE_DATA=str(tmp_path / "absent.tar.xz"), timeout=120)
    assert code == 2 and "no CIFAR-10 archive at" in log and "carry" in log, log
    assert "=== S=" not in log
