"""--method independent: S independent networks in one launch, each branch its own
initialisation, augmentation and order of the training set, no co-training term; resume keeps it."""

from __future__ import annotations

import re

import pytest
import torch
from train_helpers import tiny_config

import divco
from divco.data import AugmentConfig
from divco.train import load_checkpoint, read_metrics, train
from divco.train.runtime import branch_epoch_orders, epoch_order
from divco.train.step import TrainStep


def test_method_is_an_option_with_cotrain_by_default(tmp_path):
    assert tiny_config(tmp_path).method == "cotrain"
    from divco.train import methods

    with pytest.raises(ValueError, match=re.escape(f"method must be one of {methods.names()}, got 'boost'")):
        tiny_config(tmp_path, method="boost")
    import argparse

    from divco.commands._train_options import add_train_options

    parser = argparse.ArgumentParser()
    add_train_options(parser)  # the CLI generated from TrainConfig
    assert parser.parse_args(["--model", "wide_resnet16_1", "--method", "independent"]).method == "independent"
    assert parser.parse_args(["--model", "wide_resnet16_1", "--method", "cbnn", "--checkpoints", "4",
                              "--cbnn-errors", "probability", "--cbnn-shrinkage", "0.5"]).checkpoints == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "wide_resnet16_1", "--method", "boost"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "wide_resnet16_1", "--method", "cbnn", "--cbnn-errors", "hinge"])


def test_branch_orders_are_those_of_separate_runs():
    orders = branch_epoch_orders(50, 7, 3, 4)
    assert orders.shape == (4, 50)
    for s in range(4):
        assert torch.equal(orders[s], epoch_order(50, 7 + s, 3))
        assert sorted(orders[s].tolist()) == list(range(50))
    assert all(not torch.equal(orders[s], orders[t]) for s in range(4) for t in range(s))


def independent_config(out, **overrides):
    augment = AugmentConfig(crop_padding=1, mixup_alpha=0.0)  # class-index targets: the labels are visible
    return tiny_config(out, method="independent", branches=3, epochs=2, train_subset=48, augment=augment,
                       **overrides)


def test_each_branch_sees_its_own_order_of_the_training_set(tmp_path, monkeypatch):
    seen = []
    original = TrainStep.__call__

    def record(self, images, targets):
        seen.append(targets.clone())
        assert images.shape[:2] == (16, 3)
        return original(self, images, targets)

    monkeypatch.setattr(TrainStep, "__call__", record)
    result = train(independent_config(tmp_path / "run"))
    assert result.completed and len(seen) == 2 * 3  # 2 epochs of 48 images in batches of 16
    from divco.data import load_dataset

    labels = load_dataset("digits", image_size=8).subset(train=48).train_labels
    for epoch in range(2):
        targets = torch.cat(seen[3 * epoch: 3 * epoch + 3])  # [48, S]: class indices, one column per branch
        for s in range(3):
            assert torch.equal(targets[:, s], labels[epoch_order(48, 0 + s, epoch)]), (epoch, s)
        assert not torch.equal(targets[:, 0], targets[:, 1])
    records = read_metrics(tmp_path / "run")
    assert all(r["cot_weight"] == 0.0 and r["train_cot"] == 0.0 for r in records)
    assert all(r["train_ensemble_acc"] is None for r in records)  # branches saw different images
    # each branch its own initialisation: the first convolution's branch slices all differ
    weight = divco.models.create("wide_resnet16_4", num_classes=10, branches=3).conv1.weight.detach()
    slices = weight.view(3, -1)
    assert all(not torch.equal(slices[s], slices[t]) for s in range(3) for t in range(s))


def test_independent_resume_is_bit_exact_and_the_method_defines_the_run(tmp_path):
    reference = train(independent_config(tmp_path / "straight"))
    first = train(independent_config(tmp_path / "stopped"), should_stop=lambda epoch, steps: epoch == 0 and steps == 2)
    assert first.interrupted and first.epochs_done == 0
    with pytest.raises(ValueError, match=r"method='cotrain' \(this run: 'independent'\)"):
        train(independent_config(tmp_path / "stopped", resume=True).replace(method="cotrain"))
    final = train(independent_config(tmp_path / "stopped", resume=True))
    assert final.completed
    a, b = load_checkpoint(reference.checkpoint), load_checkpoint(final.checkpoint)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["train_loss"] for r in read_metrics(tmp_path / "stopped")] == \
        [r["train_loss"] for r in read_metrics(tmp_path / "straight")]
