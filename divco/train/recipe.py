"""The training recipe of a run: the official Divide-and-Co-training recipe per dataset and architecture.

The official code (parser_params.py, utils/lr_scheduler.py, dataset/factory.py,
script/train_split.sh) sets, and divco's default run follows:

* SGD, momentum 0.9, Nesterov; peak lr 0.1 at ANY batch size (its linear-scaling flag
  ``is_linear_lr`` is off; ``lr_scaling="linear"`` turns the official rule on: lr x B/B0
  and momentum ** (B/B0), B0 = 128 on CIFAR, 256 on ImageNet).  ResNeXt-29 16x64d: lr 0.05.
* lr per iteration: linear warm-up from 5e-3, then cosine decay, floored at 1e-4 (CIFAR)
  or 1e-5 (ImageNet).  Warm-up: 20 epochs of a 300-epoch CIFAR run (30 for ResNeXt-29
  16x64d and SE-ResNet-164), 60 of an 1800-epoch run (none for PyramidNet), 5 on ImageNet.
* Weight decay 5e-4 for the large CIFAR networks (WRN-16-12/28-10/40-10/52-8,
  ResNeXt-29), 1e-4 for the others; on ImageNet 5e-5 for ResNet-34/50 and 1e-4 for the
  others.  Only tensors whose name contains "norm" or "bias" are exempt, so every
  BatchNorm scale (named ``bn*``) IS decayed and only biases are not.  The exp(1/S - 1)
  division applies where the paper's tables apply it (every CIFAR-10 network, WRN-40-10
  at 1800 CIFAR-100 epochs, the Wide-ResNets on ImageNet).
* Co-training weight 0.5 (Jensen-Shannon), per-epoch warm-up max(0.5 e / W, 0.005) with
  W = 40 epochs on CIFAR (80 at 1800 epochs) and 60 on ImageNet (the released script).
* Augmentation per dataset (:data:`divco.data.augment.AUGMENT_PRESETS`), mixup 0.2,
  label smoothing 0.1 on ImageNet only.

Runs of other lengths scale the warm-ups from the reference run (300 CIFAR epochs, 120
ImageNet epochs); :func:`resolve` returns the values used, which the run prints and
stores in config.json.  The "quick" recipe (the digits' default) is divco's small CPU
preset, NOT the paper's: lr 0.1 x B/128, warm-ups scaled to the run, every norm
parameter exempt from weight decay, divided weight decay, no policy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from torch import nn

from ..data.augment import AUGMENT_PRESETS, AugmentConfig

#: Dataset recipes: the official ones and divco's small CPU preset; "auto" identifies the
#: dataset from the data source (digits -> quick).
RECIPES: tuple[str, ...] = ("auto", "cifar10", "cifar100", "imagenet", "quick")

#: How the peak lr follows the batch size: "none" (the official default: 0.1 at any batch),
#: "linear" (the official is_linear_lr: lr x B/B0 and momentum ** (B/B0)), "linear_lr_only"
#: (lr x B/B0, momentum kept: the quick preset's rule).
LR_SCALINGS: tuple[str, ...] = ("none", "linear", "linear_lr_only")

COT_WEIGHT_FLOOR = 0.005

#: The official code's CIFAR weight decay of 5e-4 ("a larger weight decay for large model").
LARGE_WEIGHT_DECAY_MODELS = frozenset({
    "wide_resnet16_12", "wide_resnet28_10", "wide_resnet40_10", "wide_resnet52_8",
    "resnext29_8x64d", "resnext29_16x64d",
})
#: ImageNet networks with the official weight decay of 5e-5 (1e-4 for the others).
SMALL_IMAGENET_WEIGHT_DECAY_MODELS = frozenset({"resnet34", "resnet50", "resnet50_d"})


@dataclass(frozen=True)
class DatasetRecipe:
    """What a dataset's recipe fixes (per-architecture exceptions are applied in :func:`resolve`)."""

    name: str
    official: bool  # the official code's recipe (False: a divco preset)
    reference_epochs: int  # the run length whose warm-ups are ``lr_warmup_epochs``/``cot_warmup_epochs``
    fixed_warmups: dict  # run length -> (lr warm-up, co-training warm-up) the official code fixes
    reference_batch: int  # B0 of the linear lr rule
    lr: float
    lr_scaling: str
    lr_warmup_epochs: float
    min_lr: float
    cot_warmup_epochs: int
    label_smoothing: float
    exempt_all_norms: bool  # exempt every norm parameter from weight decay (else: names with norm/bias)


_RECIPES: dict[str, DatasetRecipe] = {
    "cifar10": DatasetRecipe("cifar10", True, 300, {300: (20, 40), 1800: (60, 80)}, 128, 0.1, "none", 20, 1e-4, 40,
                             0.0, False),
    "cifar100": DatasetRecipe("cifar100", True, 300, {300: (20, 40), 1800: (60, 80)}, 128, 0.1, "none", 20, 1e-4,
                              40, 0.0, False),
    "imagenet": DatasetRecipe("imagenet", True, 120, {e: (5, 60) for e in (90, 100, 120, 270, 350)}, 256, 0.1,
                              "none", 5, 1e-5, 60, 0.1, False),
    "quick": DatasetRecipe("quick", False, 300, {}, 128, 0.1, "linear_lr_only", 20, 1e-4, 40, 0.0, True),
}


# -- the official tables ----------------------------------------------------------------------------


def official_weight_decay(model_name: str, dataset: str = "cifar100") -> float:
    """The official weight decay before division (parser_params.py)."""
    if dataset == "imagenet":
        return 5e-5 if model_name in SMALL_IMAGENET_WEIGHT_DECAY_MODELS else 1e-4
    return 5e-4 if model_name in LARGE_WEIGHT_DECAY_MODELS else 1e-4


def default_weight_decay(model_name: str) -> float:
    """The official CIFAR weight decay of ``model_name`` (the table of the CIFAR networks)."""
    return official_weight_decay(model_name, "cifar100")


def divided_weight_decay(weight_decay: float, branches: int) -> float:
    """wd x exp(1/S - 1): smaller networks, less regularisation (the official non-linear rule)."""
    return weight_decay * math.exp(1.0 / branches - 1.0)


def official_divides_weight_decay(model_name: str, dataset: str, epochs: int) -> bool:
    """Where the paper's tables apply exp(1/S - 1) (the parser's default is_div_wd=1 applies it
    everywhere, the released script's is_div_wd=0 nowhere; divco follows the tables):
    every CIFAR-10 network (Table III), WRN-40-10 at 1800 CIFAR-100 epochs (Table II), the
    Wide-ResNets on ImageNet (Table IV)."""
    if dataset == "imagenet":
        return model_name.startswith("wide_resnet")
    if dataset == "cifar10":
        return True
    return model_name == "wide_resnet40_10" and epochs == 1800


def _official_exceptions(model_name: str, epochs: int) -> tuple[float, Optional[float]]:
    """(lr multiplier, lr warm-up epochs at 300 epochs or None) of the official per-architecture rules."""
    if model_name == "resnext29_16x64d":
        return 0.5, 30.0
    if model_name == "se_resnet164":
        return 1.0, 30.0
    return 1.0, None


# -- parameter groups -----------------------------------------------------------------------------


def is_no_decay(module: nn.Module, param_name: str) -> bool:
    """divco's "quick" rule: every normalisation parameter and every bias is exempt."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return isinstance(module, norms) or param_name == "bias"


def is_official_no_decay(full_name: str) -> bool:
    """The official rule (utils/lr_scheduler.get_parameter_groups): "norm" or "bias" in the name."""
    return "norm" in full_name or "bias" in full_name


def parameter_groups(model: nn.Module, weight_decay: float, *, exempt_all_norms: bool = False,
                     with_names: bool = False) -> list[dict]:
    """Two optimiser groups: decayed tensors, and the exempt ones without decay.

    ``exempt_all_norms=False`` is the official rule (:func:`is_official_no_decay`: BN scales
    are decayed, biases are not); True exempts every norm parameter too (:func:`is_no_decay`).
    ``with_names`` adds each group's tensor names under "names" (not an optimiser key).
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            exempt = is_no_decay(module, name) if exempt_all_norms else is_official_no_decay(full)
            (no_decay if exempt else decay).append(param)
            (no_decay_names if exempt else decay_names).append(full)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if with_names:
        groups[0]["names"], groups[1]["names"] = decay_names, no_decay_names
    return groups


# -- resolving a run's recipe -----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedRecipe:
    """Every recipe value a run uses (no None): what config.json stores under "resolved"."""

    recipe: str
    official: bool
    lr: float
    momentum: float
    lr_scaling: str
    weight_decay: float  # after division
    base_weight_decay: float  # before division
    divide_weight_decay: bool
    exempt_all_norms: bool
    warmup_epochs: float
    warmup_start_lr: float
    min_lr: float
    cot_warmup_epochs: int
    label_smoothing: float
    augment: dict  # the resolved AugmentConfig

    def to_dict(self) -> dict:
        return asdict(self)

    def augment_config(self) -> AugmentConfig:
        values = dict(self.augment)
        for key in ("erase_scale", "erase_ratio"):
            values[key] = tuple(values[key])
        return AugmentConfig(**values)


def recipe_name(config: Any, identified: Optional[str]) -> str:
    """The dataset recipe of a run: ``config.recipe`` unless "auto", else from the identified dataset."""
    if config.recipe != "auto":
        return config.recipe
    if identified == "digits":
        return "quick"
    if identified in _RECIPES:
        return identified
    raise ValueError(
        f"cannot tell which dataset recipe fits --data {config.data!r} (not CIFAR-10/100's python layout, nor "
        f"an image folder with CIFAR-10, CIFAR-100 or ImageNet classes); pass --recipe "
        f"cifar10|cifar100|imagenet (the official recipes) or quick (divco's small preset)"
    )


def _warmups(table: DatasetRecipe, model_name: str, epochs: int, lr_warmup_override: Optional[float]
             ) -> tuple[float, int]:
    """(lr warm-up, co-training warm-up) epochs: official fixed counts, else scaled from the reference."""
    _, exception = _official_exceptions(model_name, epochs) if table.official else (1.0, None)
    if epochs in table.fixed_warmups:
        lr_warmup, cot_warmup = table.fixed_warmups[epochs]
        if exception is not None and epochs == 300:
            lr_warmup = exception
        if epochs == 1800 and model_name.startswith("pyramidnet"):
            lr_warmup = 0  # the official code: no warm-up for PyramidNet's 1800 epochs
    else:
        base = exception if exception is not None else table.lr_warmup_epochs
        lr_warmup = base * epochs / table.reference_epochs
        cot_warmup = round(table.cot_warmup_epochs * epochs / table.reference_epochs)
    if lr_warmup_override is not None:
        lr_warmup = lr_warmup_override
    return float(lr_warmup), int(cot_warmup)


def resolve(config: Any, recipe: str) -> ResolvedRecipe:
    """The recipe values of ``config`` (a TrainConfig) on dataset recipe ``recipe``; explicit options win."""
    table = _RECIPES[recipe]
    dataset = recipe if recipe != "quick" else "cifar100"
    lr_multiplier, _ = _official_exceptions(config.model, config.epochs) if table.official else (1.0, None)
    lr_scaling = config.lr_scaling if config.lr_scaling is not None else table.lr_scaling
    ratio = config.batch_size / table.reference_batch
    lr = config.lr if config.lr is not None else table.lr * lr_multiplier * (ratio if lr_scaling != "none" else 1.0)
    momentum = config.momentum ** ratio if lr_scaling == "linear" else config.momentum
    base_wd = config.weight_decay if config.weight_decay is not None else official_weight_decay(config.model, dataset)
    if config.divide_weight_decay is not None:
        divide = config.divide_weight_decay
    else:
        divide = True if not table.official else official_divides_weight_decay(config.model, dataset, config.epochs)
    weight_decay = divided_weight_decay(base_wd, config.branches) if divide and config.branches > 1 else base_wd
    lr_warmup, cot_warmup = _warmups(table, config.model, config.epochs, config.warmup_epochs)
    if config.cot_warmup_epochs is not None:
        cot_warmup = config.cot_warmup_epochs
    exempt = config.exempt_norm_weight_decay if config.exempt_norm_weight_decay is not None else table.exempt_all_norms
    smoothing = config.label_smoothing if config.label_smoothing is not None else table.label_smoothing
    return ResolvedRecipe(
        recipe=recipe, official=table.official, lr=lr, momentum=momentum, lr_scaling=lr_scaling,
        weight_decay=weight_decay, base_weight_decay=base_wd, divide_weight_decay=divide and config.branches > 1,
        exempt_all_norms=exempt, warmup_epochs=min(lr_warmup, config.epochs - 1) if config.epochs > 1 else 0.0,
        warmup_start_lr=config.warmup_start_lr, min_lr=config.min_lr if config.min_lr is not None else table.min_lr,
        cot_warmup_epochs=cot_warmup, label_smoothing=smoothing,
        augment=resolve_augment(config.augment, recipe).to_dict(),
    )


def resolve_augment(augment: AugmentConfig, recipe: str) -> AugmentConfig:
    """``augment`` with the dataset recipe's crop, policy and erasing where they are None."""
    return augment.with_defaults(**AUGMENT_PRESETS[recipe])


# -- the schedules ----------------------------------------------------------------------------------


class StepSchedule:
    """A learning rate per iteration, ``lr(step)``, written into every parameter group.

    ``step()`` moves to the next iteration; the state is the iteration counter, so a resumed
    run continues exactly. Subclasses define :meth:`lr`.
    """

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.last_step = 0

    def lr(self, step: int) -> float:
        raise NotImplementedError

    def _apply(self, rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = rate  # a Python float: changing it needs no device work

    def step(self) -> None:
        self.last_step += 1
        self._apply(self.lr(self.last_step))

    def current_lr(self) -> float:
        return self.lr(self.last_step)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply(self.lr(self.last_step))


class WarmupCosineSchedule(StepSchedule):
    """Learning rate per iteration: linear warm-up, then cosine decay with a floor.

    ``lr(T)`` for iteration ``T`` (0-based, counted over the whole run) follows the
    official ``lr_scheduler`` in "cos" mode.  ``step()`` sets the next iteration's rate
    on every parameter group; the state is the iteration counter.
    """

    def __init__(self, optimizer, *, base_lr: float, total_steps: int, warmup_steps: int,
                 warmup_start_lr: float, min_lr: float) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must lie in [0, {total_steps}), got {warmup_steps}")
        super().__init__(optimizer)
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_start_lr = min(warmup_start_lr, base_lr)
        self.min_lr = min(min_lr, base_lr)
        self._apply(self.lr(0))

    def lr(self, step: int) -> float:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            rate = self.warmup_start_lr + step / self.warmup_steps * (self.base_lr - self.warmup_start_lr)
            return min(rate, self.base_lr)
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return max(0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress)), self.min_lr)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """The lr warm-up in iterations (the official slow_start_epochs x iters_per_epoch)."""
    return max(0, min(round(warmup_epochs * steps_per_epoch), total_steps - 1))


def cot_weight_for_epoch(epoch: int, weight: float, warmup_epochs: int) -> float:
    """The official per-epoch warm-up: max(weight * epoch / warmup, 0.005) before ``warmup_epochs``."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return max(weight * epoch / warmup_epochs, min(COT_WEIGHT_FLOOR, weight))
    return weight


# -- the fully resolved run (divco train --print-config) ------------------------------------------------

#: Training images of the datasets whose size is known without reading them.
_TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "digits": 10}


def _augment_pipeline(augment: AugmentConfig) -> list[str]:
    """The training-view steps in the order they run (the official code's order)."""
    steps = []
    if augment.crop == "resized":
        steps.append("random_resized_crop(scale=(0.1, 1.0), ratio=(3/4, 4/3), bicubic)")
    elif augment.crop_padding:
        steps.append(f"random_crop(padding={augment.crop_padding})")
    if augment.flip:
        steps.append("horizontal_flip(p=0.5)")
    if augment.policy == "randaugment":
        steps.append(f"randaugment(ops={augment.randaugment_ops}, magnitude={augment.randaugment_magnitude})")
    elif augment.policy != "none":
        steps.append({"autoaugment": "autoaugment(CIFAR-10 policy)",
                      "autoaugment_imagenet": "autoaugment(ImageNet policy)"}[augment.policy])
    steps.append("normalize(dataset mean, std)")
    if augment.erase_p:
        steps.append(f"random_erasing(p={augment.erase_p}, scale={tuple(augment.erase_scale)}, "
                     f"ratio={tuple(augment.erase_ratio)}, value=0)")
    return steps


def _departures(config: Any, resolved: ResolvedRecipe, table: DatasetRecipe) -> list[str]:
    """Options of this run that differ from the official recipe of its dataset."""
    if not table.official:
        return [f"recipe {resolved.recipe!r} is divco's small preset, not the paper's recipe"]
    notes = []
    for name in ("lr", "lr_scaling", "weight_decay", "divide_weight_decay", "exempt_norm_weight_decay",
                 "warmup_epochs", "min_lr", "label_smoothing", "cot_warmup_epochs"):
        if getattr(config, name) is not None:
            notes.append(f"{name}={getattr(config, name)!r} set explicitly")
    if config.epochs not in table.fixed_warmups:
        notes.append(f"{config.epochs} epochs: not an official run length, warm-ups scaled from "
                     f"{table.reference_epochs} epochs")
    for name in ("crop", "policy", "erase_scale", "erase_ratio"):
        if getattr(config.augment, name) is not None:
            notes.append(f"augment.{name}={getattr(config.augment, name)!r} set explicitly")
    if config.augment.same_view:
        notes.append("same_view: every branch sees the same view (official: one view per branch)")
    if config.model_kwargs.get("shakedrop_gate") == "sample":
        notes.append("shakedrop_gate='sample' (official: one gate per batch)")
    return notes


def resolve_run(config: Any, identified: Optional[str] = None) -> dict:
    """The fully resolved run of ``config`` as a JSON-ready dict (``divco train --print-config``).

    Builds the model on the meta device (no memory) to list the optimiser's parameter
    groups; reads the data only where its size cannot be known otherwise (digits, image
    folders), through the cache.  Keys (stable, listed in the README): recipe, model,
    epochs, batch_size, train_images, steps_per_epoch, optimizer, lr_schedule, cotrain,
    augmentation, mixup, label_smoothing, precision, execution, departures.
    """
    import torch

    from .. import models
    from ..data.sources import identify_dataset, load_dataset
    from .runtime import resolve_precision

    if identified is None:
        identified = identify_dataset(config.data)
    name = recipe_name(config, identified)
    resolved = resolve(config, name)
    table = _RECIPES[name]
    train_images = _TRAIN_IMAGES.get(identified)
    num_classes = _NUM_CLASSES.get(identified)
    if train_images is None or num_classes is None:  # digits or an image folder: read (or reuse) its cache
        data = load_dataset(config.data, image_size=config.image_size, cache_dir=config.cache_dir)
        train_images, num_classes = len(data.train_labels), data.num_classes
    if config.train_subset is not None:
        train_images = min(train_images, config.train_subset)
    steps_per_epoch = train_images // config.batch_size
    total_steps = config.epochs * steps_per_epoch

    with torch.device("meta"):
        model = models.create(config.model, num_classes=num_classes, branches=config.branches, **config.model_kwargs)
    groups = parameter_groups(model, resolved.weight_decay, exempt_all_norms=resolved.exempt_all_norms,
                              with_names=True)
    augment = resolved.augment_config()
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else str(config.device)
    device = "cpu" if device == "auto" else device
    amp_dtype, scaler = resolve_precision(config.precision, torch.device(device.split(":")[0]))
    spec = getattr(model, "spec", None)
    run = {
        "recipe": {"name": name, "official": table.official, "identified_dataset": identified,
                   "chosen": "explicit --recipe" if config.recipe != "auto" else "identified from --data"},
        "model": {"name": config.model, "branches": config.branches, "num_classes": num_classes,
                  "kwargs": dict(config.model_kwargs), "parameters": sum(p.numel() for p in model.parameters()),
                  "spec": asdict(spec) if spec is not None and hasattr(spec, "__dataclass_fields__") else None},
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "train_images": train_images,
        "steps_per_epoch": steps_per_epoch,
        "optimizer": {
            "type": "SGD", "lr": resolved.lr, "momentum": resolved.momentum, "nesterov": config.nesterov,
            "lr_scaling": resolved.lr_scaling, "base_weight_decay": resolved.base_weight_decay,
            "weight_decay_divided_by_exp(1/S-1)": resolved.divide_weight_decay,
            "no_decay_rule": ("every norm parameter and bias" if resolved.exempt_all_norms
                              else "names containing 'norm' or 'bias' (official)"),
            "groups": [{"name": g["name"], "weight_decay": g["weight_decay"], "tensors": len(g["names"]),
                        "names": g["names"]} for g in groups],
        },
        "lr_schedule": {"type": "linear warm-up then cosine", "per": "iteration", "peak": resolved.lr,
                        "warmup_epochs": resolved.warmup_epochs, "warmup_start_lr": resolved.warmup_start_lr,
                        "warmup_steps": warmup_steps(resolved.warmup_epochs, steps_per_epoch, max(total_steps, 1)),
                        "floor": resolved.min_lr, "total_steps": total_steps},
        "cotrain": {"kind": config.cot_kind, "weight": config.cot_weight, "temperature": config.temperature,
                    "warmup": "per epoch: max(weight * epoch / warmup_epochs, 0.005)",
                    "warmup_epochs": resolved.cot_warmup_epochs} if config.branches > 1 else None,
        "augmentation": {"views": "one independent view per branch" if not augment.same_view
                         else "the same view for every branch",
                         "pipeline_per_branch": _augment_pipeline(augment), "config": augment.to_dict()},
        "mixup": {"alpha": augment.mixup_alpha, "shared": "one lambda and one pairing for all branches"},
        "label_smoothing": resolved.label_smoothing,
        "precision": {"setting": config.precision, "device": device,
                      "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
                      "grad_scaler": scaler},
        "execution": config.execution,
        "departures": _departures(config, resolved, table),
    }
    if getattr(config, "checkpoint_ensemble", False):
        run["lr_schedule"], run["checkpoint_ensemble"] = _checkpoint_ensemble_plan(
            config, resolved.lr, run["lr_schedule"], total_steps)
    return json.loads(json.dumps(run))


def _checkpoint_ensemble_plan(config: Any, peak: float, schedule: dict, total_steps: int) -> tuple[dict, dict]:
    """The lr schedule and the member plan of a snapshot/cbnn run (--print-config)."""
    from ..ensembles.boosting import checkpoint_epochs, resolve_damping
    from ..ensembles.snapshot import SnapshotSchedule

    plan = {"method": config.method, "members": config.members, "ensemble": "weighted mean of the members' "
            "probabilities (mean_probs)"}
    if config.method == "snapshot":
        cycles = SnapshotSchedule(max(total_steps, config.members), config.members)
        schedule = {"type": "snapshot: cosine cycles with restarts, no warm-up", "per": "iteration", "peak": peak,
                    "cycles": config.members, "cycle_steps": cycles.cycle_length, "total_steps": total_steps}
        plan.update(member_iterations=cycles.snapshot_iterations(), weights="equal")
    else:
        shrinkage, max_weight_ratio = resolve_damping(config.cbnn_shrinkage, config.cbnn_weight_ratio)
        plan.update(member_epochs=checkpoint_epochs(config.epochs, config.members), weights="alpha_j normalised",
                    shrinkage=shrinkage, errors=config.cbnn_errors or "zero_one", max_weight_ratio=max_weight_ratio)
    return schedule, plan  # the JSON form (tuples as lists), equal to what is printed
