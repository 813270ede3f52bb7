"""Goals, ratios, the plan's order and the atomic result files (divco.benchmark.goals/plan/report)."""

import json

import pytest
import torch

from divco.benchmark import goals, report
from divco.benchmark.plan import default_profile, groups, methods_at
from divco.benchmark.steps import Variant


def _rec(method, ips, *, device="cuda", model="wide_resnet16_8", S=4, phase="train", dtype="bfloat16",
         status="ok"):
    return {"kind": "network", "group": f"{model}/S{S}/{phase}", "device_type": device, "model": model,
            "group_branches": S, "branches": 1 if method == "undivided" else S, "phase": phase,
            "batch_size": 256, "variant": dtype, "dtype": dtype, "method": method, "status": status,
            "images_per_s": ips if status == "ok" else None, "step_time_s": 256 / ips if ips else None,
            "peak_memory_bytes": 2**30, "mfu": 0.25, "reason": "" if status == "ok" else "why"}


def test_goal_checks_on_the_gpu():
    records = [_rec("divco-batched", 3000), _rec("loop", 1000), _rec("vmap", 2000), _rec("packed", 2400),
               _rec("undivided", 3300)]
    checks = {c.goal.versus: c for c in goals.check_goals(records)}
    assert checks["loop"].ratio == pytest.approx(3.0) and checks["loop"].met
    assert checks["vmap"].ratio == pytest.approx(1.5) and checks["vmap"].met
    assert checks["packed"].ratio == pytest.approx(1.25) and checks["packed"].met is False
    assert checks["packed"].shortfall == pytest.approx(1 - 1.25 / 1.3)
    assert checks["undivided"].met is False


def test_goals_apply_where_they_are_set():
    # the loop goal is set at S=4; ResNet-50 has no GPU goal; float32 is not the GPU goal's dtype
    at_two = goals.check_goals([_rec("divco-batched", 3000, S=2), _rec("loop", 1000, S=2)])
    assert not at_two
    assert not goals.check_goals([_rec("divco-batched", 1, model="resnet50"), _rec("loop", 2, model="resnet50")])
    assert not goals.check_goals([_rec("divco-batched", 1, dtype="float32"), _rec("loop", 2, dtype="float32")])
    cpu = goals.check_goals([_rec("divco-per-branch", 90, device="cpu", S=2, dtype="float32"),
                             _rec("loop", 100, device="cpu", S=2, dtype="float32")])
    assert len(cpu) == 1 and cpu[0].met is False and cpu[0].ratio == pytest.approx(0.9)


def test_a_failed_side_is_not_a_ratio():
    checks = goals.check_goals([_rec("divco-batched", 3000), _rec("loop", None, status="failed")])
    assert len(checks) == 1 and checks[0].ratio is None and checks[0].met is None


def _results(records):
    return {"complete": True, "elapsed_s": 1.0, "notes": [], "ops": [], "profiles": [], "matmul_peak": None,
            "profile": {"device": "cuda", "quick": False, "repeats": 3, "warmup": 1},
            "machine": {"gpu_name": "Test GPU", "cuda_driver": "1", "cpu_model": "cpu", "cpu_cores": 2,
                        "torch_threads": 2, "torch": "t", "triton": "t", "divco": "d", "python": "3",
                        "date": "today"},
            "records": records}


def test_markdown_table_and_plots(tmp_path):
    records = [_rec("divco-batched", 3000), _rec("loop", 1000), _rec("undivided", 3300),
               _rec("divco-batched", 3100, S=1), _rec("undivided", 3300, S=1)]
    for r in records[3:]:
        r["group"] = "wide_resnet16_8/S1/train"
    written = report.write_all(tmp_path, _results(records))
    names = {p.name for p in written}
    assert {"results.json", "results.md", "train.png"} <= names
    text = (tmp_path / "results.md").read_text()
    assert "| wide_resnet16_8 | 4 | bfloat16 | 256 | divco-batched | 3000.0 | 85.33 | 3.00x | 0.91x | 1024 | 25.0% |" \
        in text
    assert "NO (9% short)" in text  # divco vs undivided: 0.91x of a 1.0x goal
    assert json.loads((tmp_path / "results.json").read_text())["records"][0]["method"] == "divco-batched"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    report.atomic_write(path, lambda f: f.write("old"))

    def broken(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        report.atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_plan_runs_the_goals_comparisons_first():
    plan = groups(default_profile("cuda"))
    assert [g.id for g in plan[:3]] == ["wide_resnet16_8/S4/train/b256/bfloat16",
                                        "wide_resnet28_10/S4/train/b256/bfloat16",
                                        "resnet50/S2/train/b128/bfloat16"]
    first_compiled = next(i for i, g in enumerate(plan) if g.variant.compile)
    assert all(not g.variant.compile for g in plan[:first_compiled])
    assert len({g.id for g in plan}) == len(plan)
    # every (model, S, phase, variant, batch) of the profile is planned exactly once
    profile = default_profile("cuda")
    expected = sum(len(c.branches) * (len(profile.train_variants) + len(profile.infer_variants) * len(c.infer_batches))
                   for c in profile.cases)
    assert len(plan) == expected


def test_methods_per_comparison():
    cuda, cpu = default_profile("cuda"), default_profile("cpu")
    assert methods_at(cuda, 1, Variant()) == ("divco-batched", "undivided")
    assert methods_at(cuda, 4, Variant(torch.bfloat16))[0] == "divco-batched"
    assert "divco-per-branch" not in methods_at(cuda, 4, Variant(torch.bfloat16, compile=True))
    assert set(methods_at(cpu, 2, Variant())) == set(cpu.methods)
