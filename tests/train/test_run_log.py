"""metrics.jsonl appends durably, drops epochs a resume recomputes, and feeds TensorBoard when present."""

from __future__ import annotations

import json
import sys
import types

import pytest

from divco.train import read_metrics
from divco.train.run_log import METRICS_NAME, RunLog


def test_append_and_resume_truncation(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch})
    log.close()
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    # resuming from the end of epoch 2: epoch 3 will be recomputed, so its record goes
    resumed = RunLog(tmp_path, tensorboard=False, epochs_done=2)
    assert [r["epoch"] for r in resumed.records] == [1, 2]
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / METRICS_NAME).write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2 is not JSON"):
        read_metrics(tmp_path)


def test_tensorboard_receives_scalars_when_installed(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    log = RunLog(tmp_path, tensorboard=True, epochs_done=4)
    log.append({"epoch": 5, "train_loss": 0.5, "test_branch_acc": [0.9, 0.8], "test_ensembles": {"max": {}},
                "test_disagreement": None})
    log.close()
    assert calls[0] == ("init", str(tmp_path / "tensorboard"), 5)
    assert ("train_loss", 0.5, 5) in calls and ("test_branch_acc/1", 0.8, 5) in calls
    assert calls[-1] == ("close",)
    assert json.loads((tmp_path / METRICS_NAME).read_text())["epoch"] == 5


def test_tensorboard_absent_is_fine(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    log = RunLog(tmp_path, tensorboard=True)
    assert log.writer is None
    log.append({"epoch": 1})
    assert read_metrics(tmp_path) == [{"epoch": 1}]
