"""A run of one network (S=1, the snapshot/cbnn members) prints what applies to it: no ensemble rows,
no co-training warm-up."""

from __future__ import annotations

import pytest

from divco.cli import main
from divco.train.evaluation import EvaluationResult, Scores, table_rows

TINY = ["--model", "wide_resnet16_1", "--data", "digits", "--image-size", "8", "--crop-padding", "1",
        "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--epochs", "1", "--no-tensorboard"]


def _scores(acc: float) -> Scores:
    return Scores(*([acc] + [0.5] * (len(Scores.__dataclass_fields__) - 1)))


def test_one_branch_has_no_ensemble_rows():
    ensembles = {mode: _scores(0.5) for mode in ("mean_logits", "mean_probs", "vote")}
    assert [name for name, _ in table_rows([_scores(0.5)], ensembles)] == ["branch 0"]
    assert [name for name, _ in table_rows([_scores(0.4), _scores(0.6)], ensembles)] == \
        ["branch 0", "branch 1", "ensemble mean_logits", "ensemble mean_probs", "ensemble vote"]
    table = EvaluationResult(32, [_scores(0.5)], ensembles, None).table()
    assert "ensemble" not in table and "branch 0" in table


@pytest.mark.parametrize("branches, says", [("1", "no co-training (one network)"),
                                            ("2", "co-training warm-up 0 epoch(s)")])
def test_the_start_line_mentions_co_training_only_where_it_runs(tmp_path, capsys, branches, says):
    assert main(["train", *TINY, "--branches", branches, "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    start = next(line for line in captured.err.splitlines() if line.startswith("divco "))
    assert start.endswith(says), start
    assert ("ensemble mean_probs" in captured.out) == (branches != "1"), captured.out
