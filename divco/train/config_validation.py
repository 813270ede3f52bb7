"""The checks of TrainConfig's values: each failure names the option, what it expects and what came.

A config is checked when it is made (and by ``TrainConfig.validate``); the method's own options and
rules are asked of the method (divco.train.methods). What needs the machine, the environment or the
data is checked later, once per run (divco.train.run_checks).
"""

from __future__ import annotations

import math
from typing import Any

from ..data.augment import AugmentConfig
from ..data.dataset import check_val_split
from ..vocabulary import LR_SCALINGS, NONFINITE_POLICIES, PRECISIONS, RECIPES
from ..vocabulary import COTRAIN_KINDS as COT_KINDS
from ..vocabulary import EXECUTION_MODES as EXECUTIONS
from . import methods
from .capture import check_capture

DEVICES = ("auto", "cpu", "cuda")


def validate_config(config: Any) -> None:
    """Raise ValueError naming the first bad option (expected vs given)."""
    from ..models import get_entry

    if not isinstance(config.model, str) or not config.model:
        raise ValueError(f"model must be a model name, got {config.model!r}")
    get_entry(config.model)  # unknown model -> ValueError with the closest names
    if not isinstance(config.out, str) or not config.out:
        raise ValueError(f"out must be a folder path, got {config.out!r}")
    _positive_int("branches", config.branches)
    _positive_int("epochs", config.epochs)
    _positive_int("batch_size", config.batch_size)
    _positive_int("seed", config.seed, minimum=0)
    _positive_int("keep_checkpoints", config.keep_checkpoints)
    _positive_int("branch_parallel", config.branch_parallel)
    _positive_int("eval_batch_size", config.eval_batch_size, allow_none=True)
    _positive_int("train_subset", config.train_subset, allow_none=True)
    _positive_int("test_subset", config.test_subset, allow_none=True)
    check_val_split(config.val_split)
    _positive_int("image_size", config.image_size, allow_none=True, minimum=8)
    _positive_int("cot_warmup_epochs", config.cot_warmup_epochs, allow_none=True, minimum=0)
    _number("lr", config.lr, 0.0, low_open=True, allow_none=True)
    _number("momentum", config.momentum, 0.0, low_open=False)
    if config.momentum >= 1:
        raise ValueError(f"momentum must be < 1, got {config.momentum!r}")
    _number("weight_decay", config.weight_decay, 0.0, low_open=False, allow_none=True)
    _number("warmup_epochs", config.warmup_epochs, 0.0, low_open=False, allow_none=True)
    if config.warmup_epochs is not None and config.warmup_epochs >= config.epochs:
        raise ValueError(f"warmup_epochs must be < epochs ({config.epochs}), got {config.warmup_epochs!r}")
    _number("warmup_start_lr", config.warmup_start_lr, 0.0, low_open=False)
    _number("min_lr", config.min_lr, 0.0, low_open=False, allow_none=True)
    _number("label_smoothing", config.label_smoothing, 0.0, low_open=False, allow_none=True)
    if config.label_smoothing is not None and config.label_smoothing >= 1:
        raise ValueError(f"label_smoothing must be < 1, got {config.label_smoothing!r}")
    for name, choices in (("recipe", RECIPES), ("lr_scaling", LR_SCALINGS)):
        value = getattr(config, name)
        if value is not None and value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    for name in ("divide_weight_decay", "exempt_norm_weight_decay"):
        if getattr(config, name) not in (None, True, False):
            raise ValueError(f"{name} must be True, False or None (the recipe's), got {getattr(config, name)!r}")
    _validate_method(config)
    _number("cot_weight", config.cot_weight, 0.0, low_open=False)
    _number("temperature", config.temperature, 0.0, low_open=True)
    _validate_choices(config)


def _validate_choices(config: Any) -> None:
    """The options that name a choice, and the two structured ones."""
    for name, choices in (("cot_kind", COT_KINDS), ("on_nan", NONFINITE_POLICIES), ("precision", PRECISIONS),
                          ("execution", EXECUTIONS)):
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(config, name)!r}")
    check_capture(config.capture, config.compile)  # one of CAPTURE_MODES, not contradicting compile
    if config.cudnn_benchmark not in (True, False):
        raise ValueError(f"cudnn_benchmark must be True or False, got {config.cudnn_benchmark!r}")
    device = str(config.device)
    if not (device in DEVICES or device.startswith("cuda:")):
        raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {config.device!r}")
    if not isinstance(config.model_kwargs, dict):
        raise ValueError(f"model_kwargs must be a dict, got {type(config.model_kwargs).__name__}")
    if not isinstance(config.augment, AugmentConfig):
        raise ValueError(f"augment must be an AugmentConfig, got {type(config.augment).__name__}")


def _validate_method(config: Any) -> None:
    """The method's name, its own options only with it, then the method's checks."""
    method = methods.method_class(config.method)
    for name, owners in methods.method_options().items():
        if getattr(config, name) is not None and name not in method.options:
            whose = f"methods {' and '.join(owners)}" if len(owners) > 1 else f"method {owners[0]}"
            raise ValueError(f"{name} is an option of the {whose}; this run's method is {config.method!r}")
    method().validate(config)


def _positive_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _number(name: str, value: Any, low: float, *, low_open: bool, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if low_open else '>='} {low}, got {value!r}")
