"""The paper's recipe: lr schedule, weight decay table and division, no decay on BN/bias, cot warm-up."""

from __future__ import annotations

import math

import pytest
import torch

import divco
from divco.train import recipe


def official_lr(T: int, *, init_lr: float, iters: int, epochs: int, slow_epochs: int, slow_lr=5e-3, end_lr=1e-4):
    """The official lr_scheduler in "cos" mode, written out literally."""
    slow_iters = slow_epochs * iters
    total = (epochs - slow_epochs) * iters
    if slow_iters > 0 and T <= slow_iters:
        lr = min(T / slow_iters * (init_lr - slow_lr) + slow_lr, init_lr)
    else:
        lr = 0.5 * init_lr * (1 + math.cos((T - slow_iters) / total * math.pi))
    return max(lr, end_lr)


def test_schedule_matches_the_official_scheduler():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    iters, epochs = 7, 300
    schedule = recipe.WarmupCosineSchedule(optimizer, base_lr=0.1, total_steps=epochs * iters,
                                           warmup_steps=20 * iters, warmup_start_lr=5e-3, min_lr=1e-4)
    for T in list(range(0, 200)) + list(range(2000, epochs * iters)):
        assert schedule.lr(T) == pytest.approx(official_lr(T, init_lr=0.1, iters=iters, epochs=epochs,
                                                           slow_epochs=20), abs=1e-15), T
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    for _ in range(20 * iters):
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    state = schedule.state_dict()
    fresh = recipe.WarmupCosineSchedule(optimizer, base_lr=0.1, total_steps=epochs * iters, warmup_steps=20 * iters,
                                        warmup_start_lr=5e-3, min_lr=1e-4)
    fresh.load_state_dict(state)
    assert fresh.current_lr() == schedule.current_lr() == optimizer.param_groups[0]["lr"]


def test_defaults_scale_with_batch_and_run_length():
    assert recipe.default_lr(128) == pytest.approx(0.1) and recipe.default_lr(512) == pytest.approx(0.4)
    assert recipe.default_lr_warmup_epochs(300) == 20 and recipe.default_lr_warmup_epochs(30) == pytest.approx(2)
    assert recipe.default_cot_warmup_epochs(300) == 40 and recipe.default_cot_warmup_epochs(15) == 2


def test_weight_decay_table_and_division():
    # the official parser_params.py values
    assert recipe.default_weight_decay("wide_resnet28_10") == 5e-4
    assert recipe.default_weight_decay("resnext29_16x64d") == 5e-4
    assert recipe.default_weight_decay("wide_resnet16_8") == 1e-4
    assert recipe.default_weight_decay("resnet110") == 1e-4
    assert recipe.divided_weight_decay(5e-4, 1) == pytest.approx(5e-4)
    assert recipe.divided_weight_decay(5e-4, 4) == pytest.approx(5e-4 * math.exp(-0.75))


def test_no_weight_decay_on_norms_and_biases():
    model = divco.models.create("se_resnet110", branches=2)  # SE convolutions have biases
    groups = recipe.parameter_groups(model, 1e-4)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        is_norm = isinstance(module, torch.nn.BatchNorm2d)
        expected = no_decay if (is_norm or name.endswith("bias")) else decay
        assert id(p) in expected, name
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    # SyncBatchNorm is a norm too
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(divco.models.create("wide_resnet16_4", branches=2))
    groups = recipe.parameter_groups(synced, 1e-4)
    assert all(p.dim() > 1 for p in groups[0]["params"])


def test_cot_weight_warmup_is_the_official_per_epoch_rule():
    values = [recipe.cot_weight_for_epoch(e, 0.5, 40) for e in range(45)]
    assert values[0] == 0.005 and values[1] == pytest.approx(0.0125)  # floor, then 0.5 * e / 40
    assert values[20] == pytest.approx(0.25) and values[39] == pytest.approx(0.5 * 39 / 40)
    assert values[40:] == [0.5] * 5
    assert recipe.cot_weight_for_epoch(0, 0.5, 0) == 0.5
    assert recipe.cot_weight_for_epoch(0, 0.0, 10) == 0.0  # no co-training stays none
