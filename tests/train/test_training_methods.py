"""The training methods as strategies: the registry, and a method added by one class and one
registry entry runs through the real engine, which calls every hook at its point."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_config

from divco.train import load_checkpoint, methods, train
from divco.train.methods import TrainingMethod
from divco.train.plan import describe, plan_from_config
from divco.train.schedules import StepSchedule


class ConstantLR(StepSchedule):
    def __init__(self, optimizer, rate: float) -> None:
        super().__init__(optimizer)
        self.rate = rate
        self._apply(rate)

    def lr(self, step: int) -> float:
        return self.rate


class Toy(TrainingMethod):
    """A constant lr, no co-training, every branch the same view; it counts what the engine asks."""

    name = "toy"
    summary = "toy (a test's method)"
    made: list["Toy"] = []

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.steps_seen = 0
        Toy.made.append(self)

    def lr_schedule(self, optimizer, plan):
        return ConstantLR(optimizer, 0.0125)

    def cot_weight(self, plan, epoch):
        return 0.0

    def start(self, run):
        self.calls.append(("start",))

    def batch(self, run, images, labels, order, step):
        views, targets, options = super().batch(run, images, labels, order, step)
        return views[:, :1].expand_as(views), targets, options  # branch 0's view for every branch

    def after_step(self, run, epoch, step, iteration):
        self.steps_seen += 1
        self.calls.append(("step", epoch, step, iteration))

    def after_epoch(self, run, epoch, record, train_images, train_labels):
        record["toy_steps"] = self.steps_seen
        self.calls.append(("epoch", epoch))

    def end_training(self, run):
        self.calls.append(("end",))

    def describe(self, plan, printed):
        printed["lr_schedule"] = {"type": "constant", "lr": 0.0125}

    def state_dict(self, run):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, run, state):
        self.steps_seen = state["steps_seen"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "toy", Toy)  # the one registry line of a new method
    Toy.made.clear()
    return Toy


def test_the_registry_names_the_methods_and_refuses_others():
    assert methods.names() == ("cotrain", "independent", "snapshot", "cbnn", "fge", "swa")
    assert [methods.create(n).name for n in methods.names()] == list(methods.names())
    with pytest.raises(ValueError, match=r"method must be one of \('cotrain', 'independent', 'snapshot', 'cbnn', "
                                         r"'fge', 'swa'\), got 'toy'"):
        methods.create("toy")
    cbnn = ("cbnn",)
    assert methods.method_options() == {
        "cbnn_errors": cbnn, "cbnn_member_weights": cbnn, "cbnn_schedule": cbnn, "cbnn_shrinkage": cbnn,
        "cbnn_weight_ratio": cbnn, "checkpoints": ("snapshot", "cbnn", "fge"),
        "fge_cycle": ("fge",), "fge_lr1": ("fge",), "fge_lr2": ("fge",), "fge_start": ("fge",),
        "swa_cycle": ("swa",), "swa_lr": ("swa",), "swa_lr_min": ("swa",), "swa_start": ("swa",)}


def test_a_registered_method_runs_through_the_engine(tmp_path, toy):
    config = tiny_config(tmp_path / "run", method="toy", epochs=2, train_subset=32)  # 2 steps per epoch
    result = train(config)
    assert result.completed
    method = Toy.made[-1]  # the run's own strategy object
    assert method.calls == [("start",), ("step", 0, 0, 1), ("step", 0, 1, 2), ("epoch", 0),
                            ("step", 1, 0, 3), ("step", 1, 1, 4), ("end",), ("epoch", 1)]
    assert [r["lr"] for r in result.history] == [0.0125, 0.0125]
    assert [r["cot_weight"] for r in result.history] == [0.0, 0.0]
    assert [r["toy_steps"] for r in result.history] == [2, 4]
    last = result.history[-1]  # weight 0: the loss is the branches' cross-entropies alone
    assert last["train_cot"] > 0 and last["train_loss"] == pytest.approx(sum(last["train_ce"]), rel=1e-6)
    assert load_checkpoint(result.checkpoint)["checkpoint_ensemble"] == {"steps_seen": 4}
    assert describe(plan_from_config(config))["lr_schedule"] == {"type": "constant", "lr": 0.0125}


def test_a_resumed_method_gets_its_state_back(tmp_path, toy):
    config = tiny_config(tmp_path / "run", method="toy", epochs=2, train_subset=32)
    stopped = train(config, should_stop=lambda epoch, steps: epoch == 1 and steps == 1)
    assert stopped.interrupted == "stop request"
    resumed = train(config.replace(resume=True))
    assert Toy.made[-1].steps_seen == 4 and resumed.history[-1]["toy_steps"] == 4
    uninterrupted = train(config.replace(out=str(tmp_path / "other")))
    same = load_checkpoint(resumed.checkpoint)["model"], load_checkpoint(uninterrupted.checkpoint)["model"]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
