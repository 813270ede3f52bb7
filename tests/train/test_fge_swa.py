"""--method fge|swa: the papers' schedules, FGE's members, SWA's average and its BN statistics, resume.

Tiny real runs on the digits at 8x8 (WRN-16-1, 48 training images, batches of 16: 3 steps an epoch).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, update_bn
from train_helpers import recording_steps, tiny_config

from divco.data import AugmentConfig, Normalize, load_dataset
from divco.ensembles.cyclic import FgeSchedule
from divco.train import load_checkpoint, train
from divco.train.checkpoint import model_from_checkpoint
from divco.train.members import MEMBERS_NAME, load_members

TRAIN_IMAGES, STEPS = 48, 3


def run_config(out, method, **overrides):
    values = dict(model="wide_resnet16_1", method=method, branches=1, epochs=6, train_subset=TRAIN_IMAGES,
                  augment=AugmentConfig(crop_padding=1, mixup_alpha=0.0), keep_checkpoints=1)
    values.update(overrides)
    return tiny_config(out, **values)


# -- the runs ----------------------------------------------------------------------------------------------


def test_fge_run_follows_the_schedule_and_takes_a_member_at_each_minimum(tmp_path, monkeypatch):
    calls = recording_steps(monkeypatch)
    result = train(run_config(tmp_path / "run", "fge", fge_cycle=2))  # cycles of 6 iterations, 3 members
    assert result.completed and len(calls) == 18
    base = result.info["base_lr"]
    rates = FgeSchedule(total=18, pretrain=3, cycle=6, members=3, lr1=base / 2, lr2=base / 200, base_lr=base,
                        warmup=result.info["resolved"]["warmup_epochs"] and 0, min_lr=1e-4)
    assert [c["lr"] for c in calls[3:]] == pytest.approx([rates.lr(s) for s in range(3, 18)])
    assert calls[3]["lr"] == pytest.approx(base / 2) and calls[6]["lr"] == pytest.approx(base / 200)
    record = json.loads((tmp_path / "run" / MEMBERS_NAME).read_text())
    assert [(m["iteration"], m["epochs_done"], m["weight"]) for m in record["members"]] == \
        [(6, 2, pytest.approx(1 / 3)), (12, 4, pytest.approx(1 / 3)), (18, 6, pytest.approx(1 / 3))]
    for member, iteration in zip(load_members(tmp_path / "run").states, (6, 12, 18)):
        for key, value in calls[iteration - 1]["model"].items():
            assert torch.equal(member["model"][key], value), key


def test_swa_average_equals_the_hand_average_with_bn_statistics_recomputed(tmp_path, monkeypatch):
    calls = recording_steps(monkeypatch)
    config = run_config(tmp_path / "run", "swa", swa_start=3)  # averages after iterations 12, 15, 18
    result = train(config)
    assert result.completed
    members = load_members(tmp_path / "run")
    assert members.record["members"][0]["averaged"] == 3 and members.weights == [1.0]
    average = members.states[0]["model"]
    for key, value in average.items():
        if value.is_floating_point() and "running" not in key:
            hand = sum(calls[i - 1]["model"][key].double() for i in (9 + 3, 12 + 3, 15 + 3)) / 3
            assert torch.allclose(value.double(), hand, atol=1e-6), key
    # the BN statistics are update_bn's on the un-augmented training images, not the SGD model's
    sgd = load_checkpoint(result.checkpoint)["model"]
    assert not torch.allclose(average["bn1.running_mean"], sgd["bn1.running_mean"])
    data = load_dataset(config.data, image_size=config.image_size).subset(config.train_subset, config.test_subset)
    state = members.states[0]
    normalize = Normalize(state["dataset"]["mean"], state["dataset"]["std"], torch.device("cpu"))
    fresh = model_from_checkpoint(state)
    fresh.load_state_dict({k: (torch.zeros_like(v) if "running" in k else v) for k, v in average.items()})
    update_bn([normalize(chunk) for chunk in data.train_images.split(16)], fresh)
    for key, value in fresh.state_dict().items():
        if "running" in key:
            assert torch.allclose(value, average[key], atol=1e-5), key
    # the last epoch's metrics are the average's: divco eval of the run evaluates the same model
    from divco.train.evaluate_checkpoint import evaluate_members

    report = evaluate_members(tmp_path / "run", device="cpu")
    assert report["ensemble"]["accuracy"] == pytest.approx(result.history[-1]["test_ensemble_acc"])


def test_swa_averaged_model_helper_agrees_with_the_run(tmp_path):
    """AveragedModel's own arithmetic: the mean of the parameters it was given (a reference check)."""
    net = torch.nn.Linear(3, 2)
    average = AveragedModel(net)
    seen = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            net.weight.fill_(value)
        average.update_parameters(net)
        seen.append(value)
    assert torch.allclose(average.module.weight, torch.full((2, 3), sum(seen) / 3))


@pytest.mark.slow
@pytest.mark.parametrize("method, changes, stop_at", [
    ("fge", dict(fge_cycle=2), (1, 2)),  # mid-epoch, before the first member
    ("fge", dict(fge_cycle=2), (3, 1)),  # after a member
    ("swa", dict(swa_start=3), (4, 1)),  # after the first average, mid-epoch: the average is in the checkpoint
])
def test_resume_equals_the_uninterrupted_run(tmp_path, method, changes, stop_at):
    reference = train(run_config(tmp_path / "straight", method, **changes))
    stopped = train(run_config(tmp_path / "stopped", method, **changes),
                    should_stop=lambda epoch, steps: (epoch, steps) == stop_at)
    assert stopped.interrupted
    final = train(run_config(tmp_path / "stopped", method, resume=True, **changes))
    assert final.completed
    a = json.loads((tmp_path / "straight" / MEMBERS_NAME).read_text())
    b = json.loads((tmp_path / "stopped" / MEMBERS_NAME).read_text())
    assert a == b
    for entry in a["members"]:
        x = load_checkpoint(tmp_path / "straight" / entry["file"])["model"]
        y = load_checkpoint(tmp_path / "stopped" / entry["file"])["model"]
        for key, value in x.items():
            assert torch.equal(value, y[key]), (entry["file"], key)
    assert [r["test_ensemble_acc"] for r in reference.history] == \
        [r["test_ensemble_acc"] for r in json.loads("[" + ",".join(
            (tmp_path / "stopped" / "metrics.jsonl").read_text().split("\n")[:-1]) + "]")]


@pytest.mark.parametrize("method, changes, message", [
    ("fge", dict(fge_lr1=0.01, fge_lr2=0.02), r"fge_lr2 .* must be below fge_lr1"),
    ("fge", dict(fge_start=6), r"fge_start must be below the run's 6 epochs"),
    ("fge", dict(fge_cycle=0), r"fge_cycle must be a finite number > 0"),
    ("fge", dict(branches=2), r"method 'fge' trains one network.*branches must be 1"),
    ("swa", dict(checkpoints=2), r"checkpoints is an option of the methods snapshot, cbnn and fge; this run's "
                                 r"method is 'swa'"),
    ("swa", dict(swa_lr=-1.0), r"swa_lr must be a finite number > 0"),
    ("swa", dict(swa_start=7), r"swa_start must be below the run's 6 epochs"),
    ("cotrain", dict(swa_lr=0.05), r"swa_lr is an option of the method swa"),
    ("snapshot", dict(fge_cycle=2), r"fge_cycle is an option of the method fge"),
])
def test_bad_options_are_refused(method, changes, message):
    with pytest.raises(ValueError, match=message):
        run_config("x", method, **changes)


@pytest.mark.parametrize("method, changes, message", [
    ("fge", dict(checkpoints=3, fge_cycle=3), r"3 FGE cycles of 9 iterations need more than the run's 18"),
    ("fge", dict(fge_start=4, fge_cycle=2), r"3 FGE members after 12 pre-training iterations .* need 27"),
    ("swa", dict(swa_start=5, swa_cycle=2), r"averages no model"),
])
def test_budgets_that_do_not_fit_are_refused_before_training(tmp_path, method, changes, message):
    with pytest.raises(ValueError, match=message):
        train(run_config(tmp_path / "run", method, **changes))
    assert not (tmp_path / "run").exists()
