"""scripts/gpu_branch_parallel.sh on the CPU: the --dry-run rehearsal (the plan within its budget, both
runs' options resolved by divco train --print-config with WORLD_SIZE=P), and its refusal of a bad P."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_branch_parallel.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _run(out: Path, *args: str, **env_overrides) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "TRITON_INTERPRET", "WORLD_SIZE")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **env_overrides)
    done = subprocess.run(["bash", str(SCRIPT), *args, str(out)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_dry_run_plans_both_runs_within_budget(tmp_path):
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_EVIDENCE_DATA=str(tmp_path / "absent.tar.xz"))
    assert code == 0, log
    plan = re.search(r"plan: data (\d+)s \+ 2 runs x (\d+)s \+ 3 x (\d+)s kill grace = (\d+)s \+ (\d+)s margin of a "
                     r"(\d+)s budget", log)
    assert plan, log
    data, limit, grace, total, margin, budget = map(int, plan.groups())
    assert total == data + 2 * limit + 3 * grace and total + margin <= budget <= 240
    assert "ddp: wide_resnet16_8 x4" in log and "DDP" in log
    assert "bp: wide_resnet16_8 x4" in log and "2 branch groups x 1 data shards, 2 branch(es) per process" in log
    assert "DRY RUN OK: 2 runs would train" in log


def test_processes_that_do_not_divide_the_branches_are_refused(tmp_path):
    code, log = _run(tmp_path / "out", "--dry-run", DIVCO_BP_PROCESSES="3")
    assert code == 2 and "the 3 processes must divide S = 4" in log, log
