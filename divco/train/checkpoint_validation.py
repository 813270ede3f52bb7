"""validate_checkpoint: the structure of a training checkpoint, checked once before anything is built.

Eval, export and resume read the same fields; a state that is not what divco writes gets one
ValueError "<source> is not a divco checkpoint: <what is wrong>". The model's weights are compared
with ``model_info`` on the meta device (no memory allocated).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NoReturn, Union

import torch


def checkpoint_config(state: dict):
    """The TrainConfig of a checkpoint; one written before the validation split had none (val_split 0)."""
    from .config import TrainConfig

    return TrainConfig.from_dict({"val_split": 0, **state["config"]})


def validate_checkpoint(state: dict, source: Union[str, Path] = "the checkpoint") -> None:
    """Check everything eval, export and resume read from a checkpoint, before anything is built."""
    check = _Fields(source)
    for key in ("config", "model_info", "dataset", "model", "optimizer", "schedule"):
        check.require(state, key, dict)
    check.require(state, "local_states", list)
    if not all(isinstance(local, dict) for local in state["local_states"]):
        check.fail("'local_states' must be a list of dicts")
    model = _check_model_info(check, state["model_info"], state["model"])
    epochs_done = check.count(state, "epochs_done")
    check.count(state, "steps_into_epoch")
    check.count(state, "world_size", minimum=1)
    _check_dataset(check, state["dataset"], model["num_classes"])
    try:
        config = checkpoint_config(state)
    except (TypeError, ValueError) as error:
        check.fail(f"its config is invalid ({error})")
    name, branches, model_kwargs = model["name"], model["branches"], model["model_kwargs"]
    if (config.model, config.branches, config.model_kwargs) != (name, branches, model_kwargs):
        check.fail(f"its config ({config.model} x{config.branches}, {config.model_kwargs}) and model_info "
                   f"({name} x{branches}, {model_kwargs}) disagree")
    if epochs_done > config.epochs:
        check.fail(f"'epochs_done' is {epochs_done} but the run has only {config.epochs} epoch(s)")
    _check_weights_match(check, state["model"], **model)


class _Fields:
    """Typed reads of a checkpoint's fields; each failure names the field and what it should be."""

    def __init__(self, source: Union[str, Path]) -> None:
        self.source = source

    def fail(self, reason: str) -> NoReturn:
        raise ValueError(f"{self.source} is not a divco checkpoint: {reason}")

    def require(self, container: dict, key: str, kinds, where: str = "") -> Any:
        if key not in container:
            self.fail(f"{where}{key!r} is missing")
        value = container[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.fail(f"{where}{key!r} must be {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
        return value

    def count(self, container: dict, key: str, where: str = "", minimum: int = 0) -> int:
        value = self.require(container, key, int, where)
        if value < minimum:
            self.fail(f"{where}{key!r} must be >= {minimum}, got {value}")
        return value


def _check_model_info(check: _Fields, info: dict, weights: dict) -> dict:
    """model_info's name, branches, classes and builder arguments, and a weight count that can hold them."""
    where = "model_info "
    model = {"name": check.require(info, "name", str, where),
             "branches": check.count(info, "branches", where, minimum=1),
             "num_classes": check.count(info, "num_classes", where, minimum=1),
             "model_kwargs": check.require(info, "model_kwargs", dict, where)}
    if not all(isinstance(k, str) for k in model["model_kwargs"]):
        check.fail("model_info 'model_kwargs' must have str keys")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        check.fail("'model' must map parameter names to tensors")
    parameters = sum(v.numel() for v in weights.values())
    if model["branches"] * model["num_classes"] > parameters:  # every branch has a classifier weight per class
        check.fail(f"model_info says {model['branches']} branch(es) x {model['num_classes']} classes but the "
                   f"weights hold only {parameters} values")
    return model


def _check_dataset(check: _Fields, dataset: dict, num_classes: int) -> None:
    for key in ("mean", "std"):
        values = check.require(dataset, key, list, "dataset ")
        if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            check.fail(f"dataset {key!r} must be 3 finite numbers, got {values!r}")
    if min(dataset["std"]) <= 0:
        check.fail(f"dataset 'std' must be > 0, got {dataset['std']!r}")
    classes = check.require(dataset, "classes", list, "dataset ")
    if len(classes) != num_classes:
        check.fail(f"dataset has {len(classes)} classes but model_info says {num_classes}")


def _check_weights_match(check: _Fields, weights: dict, name: str, num_classes: int, branches: int,
                         model_kwargs: dict) -> None:
    """The weights have exactly the names and shapes of the model model_info describes."""
    from .. import models

    try:
        with torch.device("meta"):
            expected = models.create(name, num_classes=num_classes, branches=branches, **model_kwargs).state_dict()
    except (TypeError, ValueError) as error:
        check.fail(f"model_info does not describe a model divco can build ({error})")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        check.fail(f"its weights do not match model_info {name} x{branches}: missing {missing[:3]}, "
                   f"unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            check.fail(f"its weights do not match model_info {name} x{branches}: {key} has shape "
                       f"{tuple(weights[key].shape)}, expected {tuple(tensor.shape)}")
