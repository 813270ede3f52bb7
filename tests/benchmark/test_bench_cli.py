"""`divco bench --device cpu --quick` end to end at tiny sizes."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from divco.benchmark import suite
from divco.benchmark.methods import METHODS
from divco.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--models", "wide_resnet16_4", "--branches", "1", "2", "--batch-size", "2", "--infer-batches", "1",
        "--image-size", "8", "--repeats", "2", "--warmup", "1", "--time-budget", "900"]
RECORD_FIELDS = {"model", "branches", "method", "images_per_s", "peak_memory_bytes", "batch_size", "dtype",
                 "compile", "cuda_graphs", "phase", "group", "group_branches", "status", "step_times_s"}
MACHINE_FIELDS = {"cpu_model", "cpu_cores", "gpu_name", "torch", "triton", "divco", "date", "python"}


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_quick_cpu_run(tmp_path):
    """One run (it is the slow part), three checks: files, records, the Markdown ratios."""
    code = main(["bench", "--device", "cpu", "--quick", "--out", str(tmp_path), *TINY])
    run = code, tmp_path, json.loads((tmp_path / "results.json").read_text())
    _check_files(run)
    _check_records(run)
    _check_markdown(run)


def _check_files(quick_run):
    code, out, results = quick_run
    assert code == 0
    assert results["complete"] is True
    assert _png(out / "train.png") and _png(out / "infer.png")
    assert not list(out.glob(".*.tmp")), "a temporary file of an atomic write was left behind"
    assert (out / "results.json").stat().st_mode & 0o044, "results are readable by others (not mkstemp's 0600)"
    assert MACHINE_FIELDS <= results["machine"].keys()
    assert results["machine"]["cpu_cores"] >= 1 and results["machine"]["torch"] == torch.__version__
    assert results["profile"]["device"] == "cpu" and results["profile"]["quick"] is True


def _check_records(quick_run):
    _, _, results = quick_run
    records = results["records"]
    for r in records:
        assert RECORD_FIELDS <= r.keys(), RECORD_FIELDS - r.keys()
    for phase in ("train", "infer"):
        divided = {r["method"]: r for r in records if r["phase"] == phase and r["group_branches"] == 2}
        assert set(divided) == set(METHODS), phase
        for name, r in divided.items():
            if name == "packed" and r["status"] == "skipped":  # torch-uncertainty is optional
                assert "torch-uncertainty" in r["reason"]
                continue
            assert r["status"] == "ok", (name, r["reason"])
            assert r["branches"] == (1 if name == "undivided" else 2)
            assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
            assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["step_time_s"])
            assert len(r["step_times_s"]) == 2
            # at least the parameters (float32) are in memory during a step
            assert r["peak_memory_bytes"] >= 4 * r["params"] > 0
            assert r["macs_per_image"] > 0 and r["flops_per_step"] > 0
            assert r["dtype"] == "float32" and r["compile"] is False and r["cuda_graphs"] is False
        assert divided["divco-batched"]["execution"] == "batched"
        assert divided["divco-per-branch"]["execution"] == "per_branch"
    at_one = {r["method"] for r in records if r["group_branches"] == 1}
    assert at_one == {"divco-batched", "undivided"}
    ops = results["ops"]
    assert ops, "the fused ops' micro-benchmarks are part of the run"
    for r in ops:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["impl"]


def _check_markdown(quick_run):
    _, out, results = quick_run
    text = (out / "results.md").read_text()
    assert "## Training step" in text and "## Inference" in text and "## Goals" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| wide_resnet16_4 | 2 | float32 | 2 | ")]
    assert rows, text
    by_method = {}
    for cells in rows:
        cells = [c.strip() for c in cells]
        by_method.setdefault(cells[4], []).append(cells)
    for cells in by_method["loop"]:
        assert cells[7] == "1.00x"  # the loop against itself
    for cells in by_method["undivided"]:
        assert cells[8] == "1.00x"
    records = {(r["phase"], r["method"]): r for r in results["records"] if r["group_branches"] == 2}
    train_rows = [c for c in by_method["divco-per-branch"]]
    vs_loop = float(train_rows[0][7].rstrip("x"))
    expected = records[("train", "divco-per-branch")]["images_per_s"] / records[("train", "loop")]["images_per_s"]
    assert vs_loop == pytest.approx(expected, abs=0.006)
    for cells in rows:
        for cell in cells[7:9]:
            value = float(cell.strip().rstrip("x"))
            assert 0.01 < value < 100, cells  # nonsense ratios mean a broken measurement


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path), "--methods", "loop", "fastest"]) == 2
    assert "unknown method(s) ['fastest']" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path), "--models", "wide_resnet16_5"]) == 2
    assert "unknown model 'wide_resnet16_5'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert main(["bench", "--out", str(a_file), *TINY]) == 2
    assert a_file.read_text() == "keep me"


def test_exhausted_budget_records_skips(tmp_path):
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path), *TINY, "--time-budget", "0.001",
                 "--no-ops"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["records"] and all(r["status"] == "skipped" for r in results["records"])
    assert {r["reason"] for r in results["records"]} == {"time budget exhausted"}
    assert "time budget exhausted" in (tmp_path / "results.md").read_text()


def test_quick_profile_measures_its_whole_plan_behind_budget(tmp_path, capsys, monkeypatch):
    """On a slow machine --quick skipped most cases ("time budget exhausted"); it now
    measures every comparison with fewer repeats. Without matplotlib it says no plot was drawn."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    (tmp_path / "train.png").write_bytes(b"last run's plot")
    os.utime(tmp_path / "train.png", (0, 0))
    tiny = TINY[:TINY.index("--repeats")]
    assert main(["bench", "--device", "cpu", "--quick", "--out", str(tmp_path), *tiny, "--repeats", "4",
                 "--time-budget", "0.001", "--no-ops", "--methods", "divco-batched", "loop", "undivided"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    records = results["records"]
    assert {(r["group_branches"], r["phase"]) for r in records} == {(1, "train"), (2, "train"), (1, "infer"),
                                                                    (2, "infer")}
    assert all(r["status"] == "ok" for r in records), [(r["group"], r["method"], r["reason"]) for r in records]
    assert {len(r["step_times_s"]) for r in records} == {suite.QUICK_MIN_REPEATS}
    assert any("quick profile behind" in note for note in results["notes"])
    last = out.strip().splitlines()[-1]
    assert last.startswith("wrote results.json, results.md in "), last
    assert "no plots: matplotlib is not installed" in last and "train.png" not in last


def test_dry_run_lists_the_plan(capsys):
    assert main(["bench", "--device", "cuda", "--out", "unused", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("wide_resnet16_8/S4/train/b256/bfloat16:")  # the goals' comparison first
    assert any("+compile" in line for line in lines) and any("+graphs" in line for line in lines)
    assert any(line.startswith("resnet50/S2/train/b128/") for line in lines)
