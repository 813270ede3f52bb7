"""Small real training configurations shared by the training tests."""

from __future__ import annotations

import os
from pathlib import Path

from divco.data import AugmentConfig
from divco.train import TrainConfig
from divco.train.step import TrainStep

REPO = Path(__file__).resolve().parents[2]

#: The digits at 8x8 (their native resolution) through WRN-16-4: real data, a real network,
#: a fraction of a second per step on one core.  No validation split (val_split=0): the numbers these
#: tests pin were measured without one (tests of the split turn it on).
TINY = dict(model="wide_resnet16_4", data="digits", image_size=8, progress=False, tensorboard=False,
            augment=AugmentConfig(crop_padding=1), val_split=0)


def tiny_config(out, **overrides) -> TrainConfig:
    values = dict(TINY, branches=2, epochs=2, batch_size=16, train_subset=64, test_subset=32, out=str(out))
    values.update(overrides)
    return TrainConfig(**values)


def subprocess_env() -> dict:
    """Environment for child processes: one thread each (the test workers already share the cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def checkpoint_state(value: float = 0.0, *, model: str = "wide_resnet16_2", branches: int = 1, num_classes: int = 10,
                     weights: dict = None, **fields) -> dict:
    """A structurally valid training checkpoint of an untrained model, its first weight set to ``value``."""
    import torch

    from divco import models
    from divco.train.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    if weights is None:
        weights = models.create(model, num_classes=num_classes, branches=branches).state_dict()
        first = next(iter(weights))
        weights[first] = torch.full_like(weights[first], value)
    config = tiny_config("unused", model=model, branches=branches, epochs=20)
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config.to_dict(),
        "epochs_done": 1, "steps_into_epoch": 0, "world_size": 1, "local_states": [{}],
        "model_info": {"name": model, "branches": branches, "num_classes": num_classes, "model_kwargs": {},
                       "family": "", "spec": "{}"},
        "dataset": {"name": "digits", "source": "x", "classes": [str(i) for i in range(num_classes)], "mean": [0.5] * 3,
                    "std": [0.25] * 3, "image_size": [8, 8]},
        "model": weights, "optimizer": {}, "schedule": {}, "scaler": None, "best": None, "last_record": None,
    }
    state.update(fields)
    return state


def recording_steps(monkeypatch) -> list[dict]:
    """Record the lr, the sample weights and the weights after every TrainStep call."""
    calls = []
    original = TrainStep.__call__

    def record(self, images, targets, sample_weight=None):
        lr = self.optimizer.param_groups[0]["lr"]
        out = original(self, images, targets, sample_weight=sample_weight)
        calls.append({"lr": lr, "sample_weight": None if sample_weight is None else sample_weight.clone(),
                      "model": {k: v.clone() for k, v in self.model.state_dict().items()}})
        return out

    monkeypatch.setattr(TrainStep, "__call__", record)
    return calls


def assert_train_refuses_in_one_line(arguments: list[str], message: str, out: Path, capsys) -> None:
    """``divco train`` with and without --print-config: exit status 2, one stderr line holding
    ``message``, nothing printed and no run folder."""
    from divco.cli import main

    for extra in (["--print-config"], []):
        code = main(["train", *arguments, "--out", str(out), *extra])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, captured.err)
        assert captured.out == "" and not out.exists()
