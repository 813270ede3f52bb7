"""assemble_run: the Run record of one training process - data, plan, model, optimiser, step, augmenter.

Built once per process from the run's plan (divco.train.plan.RunPlan), seeded, so the same config
assembles the same run every time; the method (divco.train.methods) builds the model, the lr schedule
and its own state through its hooks. The epoch loop (divco.train.epoch) and the checkpoints
(divco.train.run_checkpoint) read everything from the Run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from .. import models
from ..data import BatchAugmenter, ImageDataset, load_dataset
from ..data.sources import identify_loaded_dataset
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .cudnn import configure_cudnn
from .distributed import DistributedContext, convert_sync_batchnorm
from .branch_parallel.layout import BranchParallelLayout
from .layout import DataParallelLayout, TrainingLayout
from .methods import TrainingMethod, method_class
from .plan import RunPlan, plan_run
from .recipe import parameter_groups
from .run_checkpoint import checkpoint_state
from .runtime import option, seed_everything, status_line
from .schedules import StepSchedule
from .step import TrainStep, unwrap_model


@dataclass
class Run:
    """Everything a run trains with, assembled once by :func:`assemble_run` from its plan."""

    config: TrainConfig
    processes: DistributedContext
    plan: RunPlan
    data: ImageDataset
    net: nn.Module  # the BranchBatchedNetwork (SyncBN-converted when asked)
    optimizer: torch.optim.Optimizer
    schedule: StepSchedule
    scaler: Optional[torch.amp.GradScaler]
    cot_weight: Tensor
    step: TrainStep
    augmenter: BatchAugmenter
    info: dict
    layout: TrainingLayout  # where the branches and the batches are (divco.train.layout)
    best: Optional[dict] = None  # {"epoch", "selected_on", <that metric>} of best.pt (best_checkpoint.improved_best)

    @property
    def method(self) -> TrainingMethod:
        return self.plan.method

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def channels_last(self) -> bool:
        return self.plan.channels_last

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return self.plan.amp_dtype

    @property
    def batch(self) -> int:  # per data shard (per process, shared by a branch-parallel gather group)
        return self.plan.batch

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def verbose(self) -> bool:
        """Status lines and progress bars: on the main process, unless progress is off."""
        return self.processes.is_main and self.config.progress

    def report(self, line: str) -> None:
        status_line(line, self.verbose)

    def checkpoint_state(self, epochs_done: int, steps: int, last_record: Optional[dict]) -> Optional[dict]:
        """:func:`checkpoint_state` of this run (what a method writes a member checkpoint with)."""
        return checkpoint_state(self, epochs_done, steps, last_record)

    @staticmethod
    def write_checkpoint(path: Path, state: dict) -> Path:
        """Write a checkpoint (atomic); what a method writes its member checkpoints with."""
        return save_checkpoint(path, state)


def assemble_run(config: TrainConfig, processes: DistributedContext, device: torch.device) -> Run:
    """Data, plan, model, optimiser, schedule, step and augmenter of a run (seeded: the same every time)."""
    layout = make_layout(config, processes)  # collective (branch-parallel process groups): first, on every process
    if config.batch_size % layout.data_parallel:
        raise ValueError(f"batch_size {config.batch_size} is the global batch and must be divisible by the "
                         f"{layout.data_parallel} data shards")
    method_class(config.method).check_launch(processes.world_size)
    configure_cudnn(config.cudnn_benchmark, device)
    seed_everything(config.seed)
    data = _load_data(config, processes)
    plan = plan_run(config, identified=identify_loaded_dataset(config.data, data), train_images=len(data.train_labels),
                    num_classes=data.num_classes, world_size=processes.world_size, device=device)
    if plan.steps_per_epoch < 1:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data.train_labels)} training images "
                         f"({len(data.train_labels) // layout.data_parallel} per data shard); lower "
                         f"{option('batch_size')}")
    method, resolved = plan.method, plan.recipe
    net = method.build_model(lambda: layout.build_model(
        lambda: _build_model(config, processes, device, data.num_classes, plan.channels_last),
        config, device, data.num_classes, plan.channels_last))
    optimizer = torch.optim.SGD(
        parameter_groups(net, resolved.weight_decay, exempt_all_norms=resolved.exempt_all_norms), lr=resolved.lr,
        momentum=resolved.momentum, nesterov=config.nesterov)
    schedule = method.lr_schedule(optimizer, plan)
    scaler = torch.amp.GradScaler("cuda") if plan.needs_scaler else None
    cot_weight = torch.zeros((), dtype=torch.float32, device=device)

    step = TrainStep(layout.training_model(net, device), optimizer, cot_weight=cot_weight, branches=config.branches,
                     objective=method.objective(plan, cot_weight), scheduler=schedule, amp_dtype=plan.amp_dtype,
                     scaler=scaler, compile=config.compile, on_nonfinite=config.on_nan, capture=config.capture)
    # every data shard draws its own augmentations (the G processes of a branch-parallel gather group the same)
    augment_seed = int(np.random.SeedSequence([config.seed, layout.data_rank]).generate_state(1)[0])
    augmenter = BatchAugmenter(resolved.augment_config(), data.mean, data.std, device, seed=augment_seed,
                               label_smoothing=resolved.label_smoothing)
    info = {
        "dataset": data.describe(), "device": str(device), "processes": processes.world_size,
        "steps_per_epoch": plan.steps_per_epoch, "base_lr": resolved.lr, "weight_decay": resolved.weight_decay,
        "cot_warmup_epochs": resolved.cot_warmup_epochs, "precision": plan.precision,
        "channels_last": plan.channels_last, "execution": unwrap_model(net).execution,
        "params": layout.parameter_count(net), "branch_parallel": config.branch_parallel,
        "resolved": resolved.to_dict(),  # every recipe value used (warm-ups included); also in config.json
    }
    run = Run(config, processes, plan, data, net, optimizer, schedule, scaler, cot_weight, step, augmenter, info,
              layout)
    method.start(run)
    return run


def make_layout(config: TrainConfig, processes: DistributedContext) -> TrainingLayout:
    """The run's layout (every process calls it, in the same order: branch-parallel creates process groups)."""
    if config.branch_parallel == 1:
        return DataParallelLayout(processes)
    return BranchParallelLayout(config, processes)


def _load_data(config: TrainConfig, processes: DistributedContext) -> ImageDataset:
    if not processes.is_main:  # rank 0 decodes and writes the cache; the others then read it
        processes.barrier()
    data = load_dataset(config.data, image_size=config.image_size, cache_dir=config.cache_dir)
    if processes.is_main:
        processes.barrier()
    return data.with_validation(config.val_split, config.seed).subset(config.train_subset, config.test_subset)


def _build_model(config: TrainConfig, processes: DistributedContext, device: torch.device, num_classes: int,
                 channels_last: bool) -> nn.Module:
    try:
        model = models.create(config.model, num_classes=num_classes, branches=config.branches,
                              **config.model_kwargs)
    except TypeError as error:  # a builder argument of the wrong name or type
        import json

        raise ValueError(f"{option('model_kwargs', json.dumps(config.model_kwargs))} does not fit {config.model}: "
                         f"{error}") from None
    model.execution = config.execution
    if config.sync_bn:
        if not (processes.enabled and device.type == "cuda"):
            raise ValueError(f"sync_bn needs a distributed run on CUDA devices (torchrun with NCCL); "
                             f"this run has {processes.world_size} process(es) on {device}")
        model = convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
