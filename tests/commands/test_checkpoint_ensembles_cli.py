"""divco checkpoint-ensembles: single, snapshot, fge, swa and cbnn at one budget, the table, resume, refusals.

Tiny real runs on the digits at 8x8 (WRN-16-1, 48 training images, batches of 16: 3 steps an epoch).
"""

from __future__ import annotations

import json

import pytest

from divco.cli import main

COMMON = ["--model", "wide_resnet16_1", "--data", "digits", "--image-size", "8", "--epochs", "4",
          "--train-subset", "48", "--test-subset", "32", "--val-split", "16", "--batch-size", "16",
          "--mixup-alpha", "0", "--no-progress", "--no-tensorboard", "--checkpoints", "2", "--fge-cycle", "1",
          "--swa-start", "2"]


@pytest.mark.slow
def test_the_comparison_trains_every_run_once_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["checkpoint-ensembles", *COMMON, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "checkpoint-ensembles.json").read_text())
    rows = {row["run"]: row for row in report["rows"]}
    assert list(rows) == ["single", "snapshot", "fge", "swa", "cbnn"]
    assert [len(rows[n]["members"]) for n in rows] == [0, 2, 2, 1, 2]
    # the same budget: every run trained 4 epochs; fge's members at its cycles' minima, swa's one average
    assert {row["epochs"] for row in rows.values()} == {4}
    assert [m["epochs_done"] for m in rows["fge"]["members"]] == [3, 4] or \
        rows["fge"]["members"][-1]["epochs_done"] == 4
    single = {r["epoch"]: r["test_ensemble_acc"] for r in map(json.loads, (out / "single" / "metrics.jsonl")
                                                                  .read_text().splitlines())}
    for member in rows["cbnn"]["members"]:  # beside each member: the single model at that epoch
        assert member["single_at_epoch"] == single[member["epochs_done"]]
    assert rows["single"]["accuracy"] == single[4]
    for name in ("single", "snapshot", "fge", "swa", "cbnn"):
        assert f"| {name} |" in printed and f"| {name} |" in (out / "checkpoint-ensembles.md").read_text()
    # a method's own options reached only its runs: swa started averaging after epoch 2, fge had cycles of 1 epoch
    swa_config = json.loads((out / "swa" / "config.json").read_text())
    assert swa_config["swa_start"] == 2 and swa_config["checkpoints"] is None and swa_config["fge_cycle"] is None
    assert json.loads((out / "single" / "config.json").read_text())["method"] == "cotrain"
    # again: every run is finished, nothing is trained again (the member files stay as they were)
    written = {p: p.stat().st_mtime_ns for p in out.glob("*/member-*.pt")}
    assert main(["checkpoint-ensembles", *COMMON, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/member-*.pt")} == written
    assert json.loads((out / "checkpoint-ensembles.json").read_text()) == report


@pytest.mark.parametrize("extra, message", [
    (["--branches", "2"], r"--branches must be 1, got 2"),
    (["--method", "single", "single"], r"--method lists a run twice"),
])
def test_bad_comparisons_are_refused(tmp_path, capsys, extra, message):
    import re

    assert main(["checkpoint-ensembles", *COMMON, *extra, "--out", str(tmp_path / "cmp")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()


def test_an_unknown_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["checkpoint-ensembles", *COMMON, "--method", "bagging", "--out", str(tmp_path / "cmp")])
    assert "invalid choice: 'bagging'" in capsys.readouterr().err
