"""RunPlan: what a training run will do, derived once from its TrainConfig and its data.

The engine runs the plan (divco.train.engine.assemble_run consumes it) and
``divco train --print-config`` prints it (:func:`describe`): the recipe values, the steps,
the per-process batch, the device, the precision and the method, computed in one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from ..data.augment import AugmentConfig
from . import methods
from .methods import TrainingMethod
from .recipe import DatasetRecipe, ResolvedRecipe, dataset_recipe, parameter_groups, recipe_name, resolve
from .runtime import resolve_device, resolve_precision
from .schedules import warmup_steps

#: Training images of the datasets whose size is known without reading them.
_TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "digits": 10}


@dataclass(frozen=True)
class RunPlan:
    """Every derived quantity of a run; :func:`plan_run` makes it."""

    config: Any  # the TrainConfig
    method: TrainingMethod  # a fresh strategy object of config.method (it keeps the run's method state)
    recipe: ResolvedRecipe
    table: DatasetRecipe  # the dataset recipe's table
    identified: Optional[str]  # the dataset identified from --data (None: not one divco knows)
    train_images: int  # after train_subset
    num_classes: int
    world_size: int  # processes (P)
    batch: int  # per data shard: per process, of which the G of a branch-parallel gather group share it
    steps_per_epoch: int
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    needs_scaler: bool
    channels_last: bool
    data_on_disk: bool = True  # False: --print-config of data not here, sized as the recipe's dataset

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        """The lr warm-up in iterations (of a run with at least one step)."""
        return warmup_steps(self.recipe.warmup_epochs, self.steps_per_epoch, max(self.total_steps, 1))

    @property
    def branch_parallel(self) -> int:
        """G, the branch groups (1: every process holds all S branches)."""
        return self.config.branch_parallel

    @property
    def data_parallel(self) -> int:
        """D = P / G, the data shards the global batch splits into."""
        return self.world_size // self.branch_parallel

    @property
    def precision(self) -> str:
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"


def plan_run(config: Any, *, identified: Optional[str], train_images: int, num_classes: int, world_size: int = 1,
             device: Optional[torch.device] = None, data_on_disk: bool = True) -> RunPlan:
    """The plan of ``config`` on a training set of ``train_images`` images (after ``train_subset``),
    ``world_size`` processes and ``device`` (default: ``config.device`` resolved, not required to exist)."""
    if device is None:
        device = resolve_device(config.device, require_available=False)
    name = recipe_name(config, identified)
    amp_dtype, needs_scaler = resolve_precision(config.precision, device)
    data_parallel = world_size // config.branch_parallel  # the data shards (P / G)
    batch = config.batch_size // data_parallel
    return RunPlan(
        config=config, method=methods.create(config.method), recipe=resolve(config, name), table=dataset_recipe(name),
        identified=identified, train_images=train_images, num_classes=num_classes, world_size=world_size,
        batch=batch, steps_per_epoch=(train_images // data_parallel) // batch if batch else 0, device=device,
        amp_dtype=amp_dtype, needs_scaler=needs_scaler, data_on_disk=data_on_disk,
        channels_last=config.channels_last if config.channels_last is not None else device.type == "cuda")


def plan_from_config(config: Any, num_classes: Optional[int] = None) -> RunPlan:
    """The plan of ``config`` before training: the data are read only where their size cannot be
    known otherwise (digits, image folders), through the cache. Data that is not on disk takes the
    size of the ``--recipe``'s dataset (``num_classes``: its class count instead)."""
    from ..data.sources import data_on_disk, identify_dataset, load_dataset

    on_disk = data_on_disk(config.data)
    identified = identify_dataset(config.data) if on_disk else None
    name = recipe_name(config, identified)  # an unknown dataset without --recipe fails before any data is read
    sized_as = identified if on_disk else name  # no data here: the size of the recipe's dataset
    train_images = _TRAIN_IMAGES.get(sized_as)
    num_classes = num_classes or _NUM_CLASSES.get(sized_as)
    if on_disk and (train_images is None or num_classes is None):  # digits or an image folder: read its cache
        data = load_dataset(config.data, image_size=config.image_size, cache_dir=config.cache_dir)
        train_images, num_classes = len(data.train_labels), data.num_classes
    if config.train_subset is not None:
        train_images = min(train_images, config.train_subset)
    from .run_checks import planned_world_size

    return plan_run(config, identified=identified, train_images=train_images, num_classes=num_classes,
                    world_size=planned_world_size(config, print_config=True), data_on_disk=on_disk)


# -- the printed plan (divco train --print-config) ---------------------------------------------------


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
    notes = []
    if not table.official:  # and the options set explicitly on top of it
        notes.append(f"recipe {resolved.recipe!r} is divco's small preset, not the paper's recipe")
    for name in ("lr", "lr_scaling", "weight_decay", "divide_weight_decay", "exempt_norm_weight_decay",
                 "warmup_epochs", "min_lr", "label_smoothing", "cot_warmup_epochs"):
        if getattr(config, name) is not None:
            notes.append(f"{name}={getattr(config, name)!r} set explicitly")
    if table.official and config.epochs not in table.fixed_warmups:
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


def describe(plan: RunPlan) -> dict:
    """The plan as a JSON-ready dict (``divco train --print-config``).

    Builds the model on the meta device (no memory) to list the optimiser's parameter groups.
    Keys (stable, listed in the README): recipe, model, epochs, batch_size, train_images,
    steps_per_epoch, optimizer, lr_schedule, cotrain, augmentation, mixup, label_smoothing,
    precision, execution, departures; the method adds its own (checkpoint_ensemble).
    """
    from .. import models

    config, resolved = plan.config, plan.recipe
    with torch.device("meta"):
        model = models.create(config.model, num_classes=plan.num_classes, branches=config.branches,
                              **config.model_kwargs)
    groups = parameter_groups(model, resolved.weight_decay, exempt_all_norms=resolved.exempt_all_norms,
                              with_names=True)
    augment = resolved.augment_config()
    spec = getattr(model, "spec", None)
    printed = {
        "recipe": {"name": resolved.recipe, "official": plan.table.official, "identified_dataset": plan.identified,
                   "chosen": "explicit --recipe" if config.recipe != "auto" else "identified from --data"},
        "model": {"name": config.model, "branches": config.branches, "num_classes": plan.num_classes,
                  "kwargs": dict(config.model_kwargs), "parameters": sum(p.numel() for p in model.parameters()),
                  "spec": asdict(spec) if spec is not None and hasattr(spec, "__dataclass_fields__") else None},
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "train_images": plan.train_images,
        "steps_per_epoch": plan.steps_per_epoch,
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
                        "warmup_steps": plan.warmup_steps, "floor": resolved.min_lr, "total_steps": plan.total_steps},
        "cotrain": {"kind": config.cot_kind, "weight": config.cot_weight, "temperature": config.temperature,
                    "warmup": "per epoch: max(weight * epoch / warmup_epochs, 0.005)",
                    "warmup_epochs": resolved.cot_warmup_epochs} if config.branches > 1 else None,
        "augmentation": {"views": "one independent view per branch" if not augment.same_view
                         else "the same view for every branch",
                         "pipeline_per_branch": _augment_pipeline(augment), "config": augment.to_dict()},
        "mixup": {"alpha": augment.mixup_alpha, "shared": "one lambda and one pairing for all branches"},
        "label_smoothing": resolved.label_smoothing,
        "precision": {"setting": config.precision, "device": str(plan.device),
                      "autocast": str(plan.amp_dtype).replace("torch.", "") if plan.amp_dtype else None,
                      "grad_scaler": plan.needs_scaler},
        "execution": config.execution,
        "departures": _departures(config, resolved, plan.table),
    }
    if plan.branch_parallel > 1:
        printed["branch_parallel"] = branch_parallel_plan(plan)
    if not plan.data_on_disk:
        printed["data"] = {"source": config.data, "on_disk": False,
                           "sizes": f"{plan.train_images} training images of {resolved.recipe}, "
                                    f"{plan.num_classes} classes"}
    plan.method.describe(plan, printed)
    return json.loads(json.dumps(printed))  # the JSON form (tuples as lists), equal to what is printed


def branch_parallel_plan(plan: RunPlan) -> dict:
    """The ``branch_parallel`` entry of ``--print-config``: the G x D process mesh and each rank's branches."""
    import os

    S, G, P = plan.config.branches, plan.branch_parallel, plan.world_size
    per = S // G
    return {
        "branch_groups": G, "data_parallel": plan.data_parallel, "processes": P,
        "processes_from": "WORLD_SIZE" if os.environ.get("WORLD_SIZE") else "not under torchrun: the smallest "
                                                                              "launch, P = G",
        "branches_per_process": per, "batch_per_data_shard": plan.batch,
        "ranks": [{"rank": r, "branches": list(range((r % G) * per, (r % G + 1) * per)), "data_shard": r // G}
                  for r in range(P)],
        "exchanged_per_step": f"the logits [{plan.batch}, {per}, {plan.num_classes}] of each process, all-gathered "
                              f"over its {G} branch shards" + (f"; each branch shard's gradients all-reduced over "
                                                               f"its {plan.data_parallel} data shards (DDP)"
                                                               if plan.data_parallel > 1 else ""),
        "checkpoints": "the one-process format (gathered at save, sharded at resume)",
    }
