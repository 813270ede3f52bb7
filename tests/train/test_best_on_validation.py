"""--val-split: best.pt chosen on the validation split, the test set only reported; eval fits the
temperature on it and compare reports the checkpoint eval reports; resume checks it."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_config

from divco.commands.eval import chosen_checkpoint
from divco.train import read_metrics, save_checkpoint
from divco.train import train as run_training
from divco.train.checkpoint import BEST_NAME, checkpoint_config, list_checkpoints, load_checkpoint
from divco.train.comparison import comparison_rows
from divco.train.evaluate_checkpoint import evaluate_checkpoint
from divco.train.evaluation import temperature_scaling, temperature_table

VALIDATION = 40  # digits images held out of the training set


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("validated") / "run"
    config = tiny_config(out, epochs=3, train_subset=32, test_subset=16, val_split=VALIDATION, keep_checkpoints=3)
    return config, run_training(config)


def test_records_carry_the_validation_metrics_and_best_is_chosen_on_them(run):
    config, result = run
    records = read_metrics(config.out)
    assert all(r["val_images"] == VALIDATION and r["test_images"] == 16 for r in records)
    assert all(len(r["val_branch_acc"]) == 2 and "mean_logits" in r["val_ensembles"] for r in records)
    best = load_checkpoint(f"{config.out}/{BEST_NAME}")
    accuracies = [r["val_ensemble_acc"] for r in records]
    chosen = accuracies.index(max(accuracies)) + 1  # the first epoch with the best validation accuracy
    assert best["best"] == {"epoch": chosen, "selected_on": "val_ensemble_acc", "val_ensemble_acc": max(accuracies)}
    assert best["epochs_done"] == chosen
    assert "32 training, 40 validation and 16 test images" in result.info["dataset"]


def test_compare_reports_the_checkpoint_eval_reports(run):
    config, result = run
    evaluation, description = evaluate_checkpoint(config.out, device="cpu")
    row = comparison_rows([(config, result)])[0]
    assert row["reported_epoch"] == description["best"]["epoch"] == description["epochs_done"]
    assert row["selected_on"] == "val_ensemble_acc"
    assert row["test_ensemble_acc"] == pytest.approx(evaluation.ensemble_acc)
    assert row["test_nll"] == pytest.approx(evaluation.ensembles["mean_logits"].nll)
    assert chosen_checkpoint(description).startswith(f"evaluating {config.out}/{BEST_NAME} (epoch "
                                                     f"{row['reported_epoch']}: the best val_ensemble_acc")


def test_eval_fits_the_temperature_on_the_validation_split(run):
    config, _ = run
    _, description = evaluate_checkpoint(config.out, device="cpu", temperature=True)
    scaling = description["temperature_scaling"]
    assert (scaling["fit_on"], scaling["fit_images"], scaling["eval_images"]) == ("validation", VALIDATION, 16)
    assert scaling["ensembles"]["vote"]["temperature"] is None
    for row in scaling["branches"] + [r for m, r in scaling["ensembles"].items() if m != "vote"]:
        assert 0.05 <= row["temperature"] <= 20 and row["scaled"]["nll"] <= row["unscaled"]["nll"]
        assert row["eval_samples"] == 16
    assert temperature_table(scaling).startswith(f"temperature scaling: T fitted on the {VALIDATION} validation "
                                                 f"images, metrics on the 16 test images")


def test_resume_checks_the_split(run, tmp_path):
    config, _ = run
    with pytest.raises(ValueError, match=r"val_split=0\.1 \(this run: 40\)"):
        run_training(config.replace(val_split=0.1, resume=True, epochs=4))


def test_checkpoints_from_before_the_split_had_none(run, tmp_path):
    config, _ = run
    state = torch.load(list_checkpoints(config.out)[-1], weights_only=True)
    del state["config"]["val_split"]
    assert checkpoint_config(state).val_split == 0
    legacy = tmp_path / "legacy"
    save_checkpoint(legacy / "checkpoint-e0003-s000000.pt", state)
    with pytest.raises(ValueError, match=r"val_split=0\.1 \(this run: 0\)"):  # the new default is not silently used
        run_training(config.replace(out=str(legacy), val_split=0.1, resume=True, epochs=4))


def test_vote_gets_no_temperature():
    logits = torch.randn(40, 3, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 5
    report = temperature_scaling(logits, labels, fit_logits=logits[:20], fit_labels=labels[:20])
    vote = report["ensembles"]["vote"]
    assert vote["temperature"] is None and "share of votes" in vote["error"]
    assert "ensemble vote" in temperature_table(report) and "not fitted: vote's output" in temperature_table(report)
    halves = temperature_scaling(logits, labels)
    assert halves["ensembles"]["vote"]["temperature"] is None and halves["fit_on"] == "test half"
