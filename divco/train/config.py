"""TrainConfig: every option of a training run, with the paper's recipe as defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from ..data.augment import AugmentConfig
from ..models.base import EXECUTIONS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
COT_KINDS = ("js", "kl")

#: Options that change how a run executes but not what it computes (or that name where
#: it lives); everything else must match when a run is resumed.
OPERATIONAL_FIELDS = frozenset({
    "out", "resume", "device", "progress", "tensorboard", "compile", "keep_checkpoints", "cache_dir",
    "eval_batch_size", "precision", "channels_last", "execution", "backend",
})


@dataclass
class TrainConfig:
    """A divide-and-co-training run.  ``None`` means "the paper's recipe" (see divco.train.recipe).

    Required: ``model`` (a name from ``divco.models.list()``) and ``out`` (the run folder:
    checkpoints, ``metrics.jsonl``, ``config.json``).
    """

    model: str
    out: str
    branches: int = 1
    data: str = "digits"  # "digits" or a path (divco.data.describe_sources())
    epochs: int = 300
    batch_size: int = 128  # global: divided among the processes of a distributed run
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    resume: bool = False
    # -- the recipe (None: the dataset recipe's value, see divco.train.recipe) ----------------
    recipe: str = field(default="auto", metadata={
        "help": "dataset recipe: auto (identified from --data; digits -> quick), cifar10, cifar100, imagenet "
                "(the official recipes) or quick (divco's small CPU preset, not the paper's)",
        "choices": ("auto", "cifar10", "cifar100", "imagenet", "quick")})
    # -- optimiser and schedule (the recipe's when None) -------------------------------------
    lr: Optional[float] = None  # official: 0.1 at any batch size (0.05 for ResNeXt-29 16x64d)
    lr_scaling: Optional[str] = field(default=None, metadata={
        "help": "none (official: lr 0.1 at any batch), linear (the official is_linear_lr: lr x B/B0 and "
                "momentum ** (B/B0); B0 128 CIFAR, 256 ImageNet), linear_lr_only (the quick preset)",
        "choices": ("none", "linear", "linear_lr_only")})
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: Optional[float] = None  # default by model and dataset (official table), then divided
    divide_weight_decay: Optional[bool] = field(default=None, metadata={
        "help": "multiply the weight decay by exp(1/S - 1) for S > 1 (default: where the paper does, i.e. "
                "WRN-40-10 at 1800 CIFAR epochs and the ImageNet Wide-ResNets; always in the quick preset)"})
    exempt_norm_weight_decay: Optional[bool] = field(default=None, metadata={
        "help": "exempt every BatchNorm parameter from weight decay (a departure; default: the official rule, "
                "only names with 'norm'/'bias', so BN scales are decayed; on in the quick preset)"})
    warmup_epochs: Optional[float] = None  # official: 20 of 300 CIFAR epochs, 5 on ImageNet (scaled otherwise)
    warmup_start_lr: float = 5e-3
    min_lr: Optional[float] = field(default=None, metadata={
        "help": "floor of the cosine decay (default 1e-4, 1e-5 on ImageNet)"})
    label_smoothing: Optional[float] = field(default=None, metadata={
        "help": "label smoothing e of the targets (default 0.1 on ImageNet, 0 on CIFAR)"})
    # -- co-training --------------------------------------------------------------------------
    cot_weight: float = 0.5
    cot_kind: str = "js"
    cot_warmup_epochs: Optional[int] = None  # official: 40 of 300 CIFAR epochs, 60 on ImageNet (scaled otherwise)
    temperature: float = 1.0
    backend: Optional[str] = None  # divco.ops backend; None: the fastest available
    # -- data ---------------------------------------------------------------------------------
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: Optional[int] = None
    train_subset: Optional[int] = None  # use at most this many training images (a fixed choice)
    test_subset: Optional[int] = None
    cache_dir: Union[str, None, bool] = None  # None: default cache folder; False: no cache
    eval_batch_size: Optional[int] = None  # default max(batch_size, 256)
    # -- model and speed ----------------------------------------------------------------------
    model_kwargs: dict = field(default_factory=dict)
    precision: str = "auto"  # auto: bf16 autocast on GPUs (fp16 + GradScaler without bf16), fp32 on CPU
    channels_last: Optional[bool] = None  # default: on for CUDA
    compile: bool = False
    execution: str = "auto"  # BranchBatchedNetwork.execution
    sync_bn: bool = False
    # -- output -------------------------------------------------------------------------------
    keep_checkpoints: int = 3  # epoch checkpoints kept besides best.pt
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**_tuples(self.augment))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad option (expected vs given)."""
        from ..models import get_entry

        def positive_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        def number(name: str, value: Any, low: float, *, low_open: bool, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low)
            if not ok:
                raise ValueError(f"{name} must be a finite number {'>' if low_open else '>='} {low}, got {value!r}")

        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a model name, got {self.model!r}")
        get_entry(self.model)  # unknown model -> ValueError with the closest names
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a folder path, got {self.out!r}")
        positive_int("branches", self.branches)
        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("seed", self.seed, minimum=0)
        positive_int("keep_checkpoints", self.keep_checkpoints)
        positive_int("eval_batch_size", self.eval_batch_size, allow_none=True)
        positive_int("train_subset", self.train_subset, allow_none=True)
        positive_int("test_subset", self.test_subset, allow_none=True)
        positive_int("image_size", self.image_size, allow_none=True, minimum=8)
        positive_int("cot_warmup_epochs", self.cot_warmup_epochs, allow_none=True, minimum=0)
        number("lr", self.lr, 0.0, low_open=True, allow_none=True)
        number("momentum", self.momentum, 0.0, low_open=False)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be < 1, got {self.momentum!r}")
        number("weight_decay", self.weight_decay, 0.0, low_open=False, allow_none=True)
        number("warmup_epochs", self.warmup_epochs, 0.0, low_open=False, allow_none=True)
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be < epochs ({self.epochs}), got {self.warmup_epochs!r}")
        number("warmup_start_lr", self.warmup_start_lr, 0.0, low_open=False)
        number("min_lr", self.min_lr, 0.0, low_open=False, allow_none=True)
        number("label_smoothing", self.label_smoothing, 0.0, low_open=False, allow_none=True)
        if self.label_smoothing is not None and self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be < 1, got {self.label_smoothing!r}")
        for name in ("recipe", "lr_scaling"):
            choices = _choices(name)
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name in ("divide_weight_decay", "exempt_norm_weight_decay"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None (the recipe's), got {getattr(self, name)!r}")
        number("cot_weight", self.cot_weight, 0.0, low_open=False)
        number("temperature", self.temperature, 0.0, low_open=True)
        if self.cot_kind not in COT_KINDS:
            raise ValueError(f"cot_kind must be one of {COT_KINDS}, got {self.cot_kind!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        device = str(self.device)
        if not (device in DEVICES or device.startswith("cuda:")):
            raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {self.device!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        if not isinstance(self.augment, AugmentConfig):
            raise ValueError(f"augment must be an AugmentConfig, got {type(self.augment).__name__}")

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, AugmentConfig) else value
        return _lists(out)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig option(s) {unknown}")
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def run_defining_differences(self, other: "TrainConfig") -> list[str]:
        """``"name: mine vs other"`` for every option that changes what a run computes."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}={b[k]!r} (this run: {a[k]!r})" for k in a if k not in OPERATIONAL_FIELDS and a[k] != b[k]]


def _choices(name: str) -> tuple:
    return next(f.metadata["choices"] for f in fields(TrainConfig) if f.name == name)


def _lists(value):
    """Tuples to lists, recursively: the JSON form, equal before and after a round trip."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _tuples(values: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
