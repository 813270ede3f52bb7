"""TrainConfig: every option of a training run, with the paper's recipe as defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from ..data.augment import CROPS, AugmentConfig
from ..data.dataset import DEFAULT_VAL_SPLIT, parse_val_split
from ..data.policies import POLICIES
from ..data.sources import describe_sources
from ..ensembles.boosting import ERROR_KINDS as CBNN_ERROR_KINDS
from ..vocabulary import BACKENDS, LR_SCALINGS, NONFINITE_POLICIES, PRECISIONS, RECIPES
from ..vocabulary import COTRAIN_KINDS as COT_KINDS
from ..vocabulary import EXECUTION_MODES as EXECUTIONS
from .capture import CAPTURE_MODES
from .config_validation import validate_config
from . import methods
from .methods import DEFAULT_CHECKPOINTS

#: Options that cannot change what a run computes (or that name where it lives); everything
#: else - precision, channels_last, compile, backend, execution included - must match when a
#: run is resumed.  Of ``device`` only the index may change (cuda:0 -> cuda:1), not the type
#: (the training engine compares the device type a checkpoint was written on).
#: ``branch_parallel`` is one of them: a branch-parallel run computes what one process computes, and its
#: checkpoints hold the one-process state (divco.train.branch_parallel), so a run may resume in another layout.
OPERATIONAL_FIELDS = frozenset({"out", "resume", "device", "progress", "tensorboard", "keep_checkpoints", "cache_dir",
                                "branch_parallel"})


def option_field(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **option: Any) -> Any:
    """A TrainConfig field with its command-line option described in its metadata.

    ``option`` holds what :mod:`divco.commands.train_options` reads: ``help``, ``choices``,
    ``group`` (starts a help section), ``metavar``, ``type``, ``false_flag``, ``cli=False``
    (no generated option) and ``nested`` (per-field overrides of a nested dataclass).
    """
    return field(default=default, default_factory=factory, metadata={"option": option})


@dataclass
class TrainConfig:
    """A divide-and-co-training run.  ``None`` means "the paper's recipe" (see divco.train.recipe).

    Required: ``model`` (a name from ``divco.models.list()``) and ``out`` (the run folder:
    checkpoints, ``metrics.jsonl``, ``config.json``).
    """

    model: str = option_field(help="a model name (`divco models` lists them)")
    out: str = option_field(help="the run folder: checkpoints, best.pt, metrics.jsonl, config.json", cli=False)
    branches: int = option_field(1, help="S, the number of small networks", metavar="S")
    data: str = option_field("digits", help=describe_sources())
    epochs: int = option_field(300, help="the paper's")
    batch_size: int = option_field(128, help="global batch size: divided among the processes of a distributed run")
    seed: int = option_field(0)
    device: str = option_field("auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    resume: bool = option_field(False, cli=False)
    # -- the recipe (None: the dataset recipe's value, see divco.train.recipe) ----------------
    recipe: str = option_field(
        "auto", group="recipe (default: the official recipe of the dataset)",
        choices=RECIPES,
        help="dataset recipe: auto (identified from --data; digits -> quick), cifar10, cifar100, imagenet "
             "(the official recipes) or quick (divco's small CPU preset, not the paper's)")
    # -- optimiser and schedule (the recipe's when None) -------------------------------------
    lr: Optional[float] = option_field(
        None, group="optimiser and schedule (default: the recipe's)",
        help="peak learning rate (official: 0.1 at any batch size; 0.05 for ResNeXt-29 16x64d)")
    lr_scaling: Optional[str] = option_field(
        None, choices=LR_SCALINGS,
        help="none (official: lr 0.1 at any batch), linear (the official is_linear_lr: lr x B/B0 and "
             "momentum ** (B/B0); B0 128 CIFAR, 256 ImageNet), linear_lr_only (the quick preset)")
    momentum: float = option_field(0.9)
    nesterov: bool = option_field(True, help="Nesterov momentum")
    weight_decay: Optional[float] = option_field(
        None, help="default by model and dataset (the official table), then divided where the paper divides")
    divide_weight_decay: Optional[bool] = option_field(
        None, help="multiply the weight decay by exp(1/S - 1) for S > 1 (default: where the paper does, i.e. "
                   "WRN-40-10 at 1800 CIFAR epochs and the ImageNet Wide-ResNets; always in the quick preset)")
    exempt_norm_weight_decay: Optional[bool] = option_field(
        None, help="exempt every BatchNorm parameter from weight decay (a departure; default: the official rule, "
                   "only names with 'norm'/'bias', so BN scales are decayed; on in the quick preset)")
    warmup_epochs: Optional[float] = option_field(
        None, help="linear lr warm-up (official: 20 of 300 CIFAR epochs, 5 on ImageNet; scaled for other lengths)")
    warmup_start_lr: float = option_field(5e-3)
    min_lr: Optional[float] = option_field(None, help="floor of the cosine decay (default 1e-4, 1e-5 on ImageNet)")
    label_smoothing: Optional[float] = option_field(
        None, help="label smoothing e of the targets (default 0.1 on ImageNet, 0 on CIFAR)")
    # -- co-training --------------------------------------------------------------------------
    method: str = option_field(
        methods.DEFAULT_METHOD, group="co-training", choices=methods.names(),
        help="; ".join(methods.METHODS[name].summary for name in methods.names()))
    checkpoints: Optional[int] = option_field(
        None, metavar="M", help=f"M, the member checkpoints of a snapshot or cbnn run (default "
                                f"{DEFAULT_CHECKPOINTS}; 1 <= M <= epochs; only with those methods)")
    cbnn_shrinkage: Optional[float] = option_field(
        None, help="cbnn: factor (> 0) on every alpha, in the member weights and the sample-weight update alike "
                   "(default 1: the paper's rule; only with --method cbnn)")
    cbnn_errors: Optional[str] = option_field(
        None, choices=CBNN_ERROR_KINDS,
        help="cbnn: a member's per-sample error, zero_one (top-1 wrong: the paper's rule, the default) or "
             "probability (1 - p(true class)); only with --method cbnn")
    cbnn_weight_ratio: Optional[float] = option_field(
        None, metavar="R", help="cbnn: cap R (>= 1) on the ratio of the largest to the smallest sample weight after "
                                "every update; 0: no cap, plain SAMME (default 4, chosen by the measurement in "
                                "docs/ENSEMBLES.md; only with --method cbnn)")
    cot_weight: float = option_field(0.5)
    cot_kind: str = option_field("js", choices=COT_KINDS)
    cot_warmup_epochs: Optional[int] = option_field(
        None, help="linear per-epoch warm-up of the weight (official: 40 of 300 CIFAR epochs, 60 on ImageNet; "
                   "scaled for other lengths)")
    temperature: float = option_field(1.0)
    backend: Optional[str] = option_field(None, choices=BACKENDS,
                                          help="divco.ops backend (default: the fastest available)")
    # -- data ---------------------------------------------------------------------------------
    augment: AugmentConfig = option_field(factory=AugmentConfig, group="data and augmentation", nested={
        "crop_padding": {"help": "random crop from the zero-padded image; 0 disables"},
        "flip": {"help": "random horizontal flips"},
        "crop": {"help": "pad (CIFAR: random crop of the zero-padded image) or resized (ImageNet's random resized "
                         "crop); default: the recipe's", "choices": CROPS},
        "policy": {"help": "AutoAugment (CIFAR-10 or ImageNet policy) or RandAugment (default: the recipe's: "
                           "autoaugment on CIFAR, autoaugment_imagenet on ImageNet, none in quick)",
                   "choices": ("none",) + POLICIES},
        "erase_p": {"help": "random erasing probability"},
        "erase_scale": {"metavar": ("LOW", "HIGH"), "type": float, "nargs": 2,
                        "help": "erased area fraction (default: the recipe's, (0.125, 0.2) CIFAR-10, (0.0625, 0.1) "
                                "CIFAR-100, (0.05, 0.12) ImageNet)"},
        "erase_ratio": {"metavar": ("LOW", "HIGH"), "type": float, "nargs": 2,
                        "help": "aspect ratio of the erased rectangle (default: the recipe's)"},
        "mixup_alpha": {"help": "0 disables mixup"},
        "same_view": {"help": "every branch gets the same augmented view"},
    })
    image_size: Optional[int] = option_field(None, help="resize every image to this size (digits: 32)")
    train_subset: Optional[int] = option_field(None, help="train on at most this many images (a fixed choice)")
    test_subset: Optional[int] = option_field(None, help="test on at most this many images")
    val_split: Union[float, int] = option_field(
        DEFAULT_VAL_SPLIT, type=parse_val_split, metavar="FRACTION|COUNT",
        help="validation images held out of the training set (a fraction, or a count such as 5000; stratified by "
             "class, seeded; taken before --train-subset): best.pt is chosen and eval's temperature fitted on them, "
             "the test set is only reported; 0 disables (best.pt is then chosen on the test set)")
    cache_dir: Union[str, None, bool] = option_field(
        None, type=str, false_flag="no-cache",
        help="decoded-data cache (default $DIVCO_CACHE_DIR/data or ~/.cache/divco/data); --no-cache: decode every time")
    eval_batch_size: Optional[int] = option_field(None, help="default max(batch size, 256)")
    # -- model and speed ----------------------------------------------------------------------
    model_kwargs: dict = option_field(factory=dict, group="model and speed", metavar="JSON",
                                      help='extra model builder arguments, e.g. \'{"dropout": 0.1}\'')
    precision: str = option_field("auto", choices=PRECISIONS,
                                  help="auto: bf16 autocast on GPUs (fp16 + GradScaler without bf16), fp32 on CPUs")
    channels_last: Optional[bool] = option_field(None, help="channels-last memory format (default: on for CUDA)")
    compile: bool = option_field(False, help="torch.compile the forward pass and loss (the same as --capture compile)")
    capture: str = option_field(
        "none", choices=CAPTURE_MODES,
        help="how the training step is captured: none (eager), compile (forward + loss compiled), compile-step "
             "(forward, loss, backward and SGD step in one compiled graph) or cuda-graph (the whole step replayed "
             "as one CUDA graph; CUDA only, fixed batch shape); see divco/train/capture.py")
    cudnn_benchmark: bool = option_field(
        True, help="on CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest")
    execution: str = option_field("auto", choices=EXECUTIONS, help="BranchBatchedNetwork.execution")
    sync_bn: bool = option_field(False, help="synchronised BatchNorm across processes (CUDA)")
    branch_parallel: int = option_field(
        1, metavar="G", help="spread the S branches over G process groups under torchrun (G divides S and the "
                             "processes; WORLD_SIZE / G data-parallel shards): each process holds S/G branches and "
                             "only the logits are exchanged (docs/BRANCH_PARALLEL.md); 1: data parallel (DDP)")
    on_nan: str = option_field("stop", choices=NONFINITE_POLICIES,
                               help="a NaN/inf loss: stop at the end of the epoch (exit status 1), or skip-step "
                                    "(not applied, counted in train_nonfinite_steps)")
    # -- output -------------------------------------------------------------------------------
    keep_checkpoints: int = option_field(3, group="output", help="epoch checkpoints kept besides best.pt")
    progress: bool = option_field(True, help="progress bar and epoch lines")
    tensorboard: bool = option_field(True, help="TensorBoard logs (when the tensorboard package is installed)")

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**_tuples(self.augment))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad option (expected vs given): divco.train.config_validation."""
        validate_config(self)

    @property
    def members(self) -> int:
        """M, the member checkpoints of a snapshot/cbnn run (``checkpoints`` or its default)."""
        return self.checkpoints if self.checkpoints is not None else DEFAULT_CHECKPOINTS

    @property
    def checkpoint_ensemble(self) -> bool:
        """Whether this run's ensemble is made of its checkpoints (snapshot, cbnn)."""
        return methods.method_class(self.method).checkpoint_ensemble

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


def _lists(value):
    """Tuples to lists, recursively: the JSON form, equal before and after a round trip."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _tuples(values: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
