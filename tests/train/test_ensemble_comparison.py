"""The comparison table of divco checkpoint-ensembles from rows (no training)."""

from __future__ import annotations

import json

from divco.train.ensemble_comparison import comparison_table, draw, with_single_at_member_epochs


def rows(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_ensemble_acc": a}) + "\n"
                                                  for e, a in ((1, 0.30), (2, 0.50), (3, 0.60))))
    return [{"run": "single", "folder": str(single), "epochs": 3, "members": [], "accuracy": 0.60, "nll": 1.2,
             "ece": 0.15},
            {"run": "cbnn", "folder": "x", "epochs": 3, "accuracy": 0.62, "nll": 1.0, "ece": 0.03,
             "members": [{"epochs_done": 1, "steps_into_epoch": 0, "weight": 0.1, "accuracy": 0.35},
                         {"epochs_done": 3, "steps_into_epoch": 0, "weight": 0.9, "accuracy": 0.59}]}]


def test_members_stand_beside_the_single_model_at_their_epochs(tmp_path):
    table = comparison_table(with_single_at_member_epochs(rows(tmp_path)), "title")
    lines = table.splitlines()
    assert lines[0] == "title"
    assert "| single | 60.00 |  | 1.2000 | 15.00 |  |" in lines
    assert "| cbnn | 62.00 | +2.00 | 1.0000 | 3.00 | e1: 35.00 / 30.00 (w 0.10), e3: 59.00 / 60.00 (w 0.90) |" in lines


def test_the_plot_is_written(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    assert draw(with_single_at_member_epochs(rows(tmp_path)), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
