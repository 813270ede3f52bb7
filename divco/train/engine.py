"""train(config): the divide-and-co-training loop, resumable to the last bit.

One process (or one per GPU under torchrun) runs::

    for each epoch:   co-training weight <- warm-up schedule
        for each batch of its shard:   S augmented views -> TrainStep (no host sync)
        read the epoch's metrics once, evaluate on the test set,
        append to metrics.jsonl, write a checkpoint (atomic), keep the last N and the best

Everything random is drawn from generators whose state the checkpoint stores (torch
CPU/CUDA, numpy, python, the augmenter's), and the image order of an epoch is a pure
function of (seed, epoch); so a run resumed from any checkpoint - also one written by
SIGINT/SIGTERM in the middle of an epoch - computes what the uninterrupted run computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__, models
from ..data import BatchAugmenter, ImageDataset, load_dataset
from ..data.sources import identify_loaded_dataset
from ..data.cache import atomic_write_path
from . import recipe
from .checkpoint import (
    BEST_NAME,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_name,
    list_checkpoints,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import DistributedContext, convert_sync_batchnorm
from .evaluation import EvaluationResult, evaluate
from .run_log import CONFIG_NAME, RunLog, write_json
from .runtime import (
    SignalStop,
    epoch_order,
    global_rng_state,
    process_shard,
    progress_bar,
    resolve_device,
    resolve_precision,
    say,
    seed_everything,
    set_global_rng_state,
    to_model_layout,
)
from .step import TrainStep, unwrap_model

#: Record fields that measure the machine, not the run (they differ between identical runs).
TIMING_FIELDS = ("images_per_s", "epoch_time_s", "eval_time_s")

#: ``should_stop(epoch, steps_done_in_epoch) -> bool``, asked after every step.
StopRequest = Callable[[int, int], bool]


@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    history: list[dict]  # metrics.jsonl records, epoch 1 onwards (on the main process)
    final: Optional[EvaluationResult]  # test metrics after the last epoch done
    interrupted: Optional[str] = None  # "SIGTERM", "SIGINT" or "stop request" when stopped early
    checkpoint: Optional[Path] = None  # the last checkpoint written
    best_checkpoint: Optional[Path] = None
    info: dict = field(default_factory=dict)  # dataset, device, steps per epoch, lr, weight decay, params

    @property
    def completed(self) -> bool:
        return self.interrupted is None


@dataclass
class _Parts:
    """Everything a run trains with, built once."""

    data: ImageDataset
    net: nn.Module  # the BranchBatchedNetwork (SyncBN-converted when asked)
    optimizer: torch.optim.Optimizer
    schedule: recipe.WarmupCosineSchedule
    scaler: Optional[torch.amp.GradScaler]
    cot_weight: Tensor
    cot_warmup_epochs: int
    step: TrainStep
    augmenter: BatchAugmenter
    batch: int  # per process
    steps_per_epoch: int
    amp_dtype: Optional[torch.dtype]
    info: dict


class _Run:
    def __init__(self, config: TrainConfig, ctx: DistributedContext, should_stop: Optional[StopRequest]) -> None:
        self.config = config
        self.ctx = ctx
        self.should_stop = should_stop
        self.device = resolve_device(config.device, ctx.local_rank)
        self.channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.out = Path(config.out)
        self.talk = ctx.is_main and config.progress
        self.best: Optional[dict] = None

    # -- setup ---------------------------------------------------------------------------------
    def find_resume_point(self) -> Optional[tuple[Path, dict]]:
        """The checkpoint to resume, or None for a new run; refuses to overwrite a run."""
        cfg = self.config
        existing = list_checkpoints(self.out)
        if not cfg.resume:
            if existing or (self.out / "metrics.jsonl").exists():
                raise ValueError(f"{self.out} already holds a training run; pass --resume (resume=True) to continue "
                                 f"it, or choose another --out")
            return None
        if not existing:
            say(f"no checkpoint in {self.out}: starting a new run", self.talk)
            return None
        path, state = load_latest(self.out)
        differences = TrainConfig.from_dict(state["config"]).run_defining_differences(cfg)
        if differences:
            raise ValueError(f"cannot resume {path}: it was trained with different options; this command gives "
                             + "; ".join(differences) + ". Use the run's original options, or choose another --out")
        return path, state

    def load_data(self) -> ImageDataset:
        cfg = self.config
        if not self.ctx.is_main:  # rank 0 decodes and writes the cache; the others then read it
            self.ctx.barrier()
        data = load_dataset(cfg.data, image_size=cfg.image_size, cache_dir=cfg.cache_dir)
        if self.ctx.is_main:
            self.ctx.barrier()
        return data.subset(cfg.train_subset, cfg.test_subset)

    def build_model(self, num_classes: int) -> nn.Module:
        cfg = self.config
        model = models.create(cfg.model, num_classes=num_classes, branches=cfg.branches, **cfg.model_kwargs)
        model.execution = cfg.execution
        if cfg.sync_bn:
            if not (self.ctx.enabled and self.device.type == "cuda"):
                raise ValueError("sync_bn needs a distributed run on CUDA devices (torchrun with NCCL); "
                                 f"this run has {self.ctx.world_size} process(es) on {self.device}")
            model = convert_sync_batchnorm(model)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def build(self) -> _Parts:
        cfg, ctx, device = self.config, self.ctx, self.device
        if cfg.batch_size % ctx.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by the "
                             f"{ctx.world_size} processes")
        batch = cfg.batch_size // ctx.world_size
        amp_dtype, needs_scaler = resolve_precision(cfg.precision, device)
        seed_everything(cfg.seed)
        data = self.load_data()
        per_process = len(data.train_labels) // ctx.world_size
        steps_per_epoch = per_process // batch
        if steps_per_epoch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(data.train_labels)} training images "
                             f"({per_process} per process); lower --batch-size")

        net = self.build_model(data.num_classes)
        resolved = recipe.resolve(cfg, recipe.recipe_name(cfg, identify_loaded_dataset(cfg.data, data)))
        weight_decay, base_lr = resolved.weight_decay, resolved.lr
        optimizer = torch.optim.SGD(
            recipe.parameter_groups(net, weight_decay, exempt_all_norms=resolved.exempt_all_norms), lr=base_lr,
            momentum=resolved.momentum, nesterov=cfg.nesterov)
        total_steps = cfg.epochs * steps_per_epoch
        schedule = recipe.WarmupCosineSchedule(
            optimizer, base_lr=base_lr, total_steps=total_steps,
            warmup_steps=recipe.warmup_steps(resolved.warmup_epochs, steps_per_epoch, total_steps),
            warmup_start_lr=resolved.warmup_start_lr, min_lr=resolved.min_lr)
        cot_warmup = resolved.cot_warmup_epochs
        scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        cot_weight = torch.zeros((), dtype=torch.float32, device=device)

        train_model: nn.Module = net
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        step = TrainStep(train_model, optimizer, cot_weight=cot_weight, branches=cfg.branches, cot_kind=cfg.cot_kind,
                         temperature=cfg.temperature, backend=cfg.backend, scheduler=schedule, amp_dtype=amp_dtype,
                         scaler=scaler, compile=cfg.compile)
        # every process draws its own augmentations
        augment_seed = int(np.random.SeedSequence([cfg.seed, ctx.rank]).generate_state(1)[0])
        augmenter = BatchAugmenter(resolved.augment_config(), data.mean, data.std, device, seed=augment_seed,
                                   label_smoothing=resolved.label_smoothing)
        info = {
            "dataset": data.describe(), "device": str(device), "processes": ctx.world_size,
            "steps_per_epoch": steps_per_epoch, "base_lr": base_lr, "weight_decay": weight_decay,
            "cot_warmup_epochs": cot_warmup, "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "channels_last": self.channels_last, "execution": unwrap_model(net).execution,
            "params": sum(p.numel() for p in net.parameters()),
            "resolved": resolved.to_dict(),  # every recipe value used (warm-ups included); also in config.json
        }
        return _Parts(data, net, optimizer, schedule, scaler, cot_weight, cot_warmup, step, augmenter, batch,
                      steps_per_epoch, amp_dtype, info)

    # -- checkpoints ---------------------------------------------------------------------------
    def local_state(self, parts: _Parts) -> dict:
        """What each process must restore to continue bit-exactly (gathered to rank 0)."""
        return {"augmenter": parts.augmenter.state_dict(), "partial_metrics": parts.step.metrics.state_dict(),
                **global_rng_state(self.device)}

    def checkpoint_state(self, parts: _Parts, epochs_done: int, steps: int,
                         last_record: Optional[dict]) -> Optional[dict]:
        """The checkpoint of this moment on rank 0 (None elsewhere); every process must call it."""
        local_states = self.ctx.gather_objects(self.local_state(parts))
        if not self.ctx.is_main:
            return None
        cfg, data, net = self.config, parts.data, unwrap_model(parts.net)
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "divco_version": __version__,
            "torch_version": str(torch.__version__), "config": cfg.to_dict(),
            "epochs_done": epochs_done, "steps_into_epoch": steps,
            "model_info": {"name": cfg.model, "branches": cfg.branches, "num_classes": data.num_classes,
                           "model_kwargs": cfg.model_kwargs, "family": getattr(net, "family", ""),
                           "spec": spec_json(net)},
            "dataset": {"name": data.name, "source": data.source, "classes": list(data.classes),
                        "mean": list(data.mean), "std": list(data.std), "image_size": list(data.image_size)},
            "model": net.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "schedule": parts.schedule.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "best": self.best, "world_size": self.ctx.world_size, "local_states": local_states,
            "last_record": last_record,
        }

    def restore(self, parts: _Parts, path: Path, state: dict) -> tuple[int, int]:
        """Load a checkpoint into the parts; return (epochs done, steps done in the next epoch)."""
        unwrap_model(parts.net).load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.schedule.load_state_dict(state["schedule"])
        if parts.scaler is not None and state.get("scaler"):
            parts.scaler.load_state_dict(state["scaler"])
        self.best = state.get("best")
        local_states = state["local_states"]
        if len(local_states) == self.ctx.world_size:
            local = local_states[self.ctx.rank]
            parts.augmenter.load_state_dict(local["augmenter"])
            parts.step.metrics.load_state_dict(local["partial_metrics"])
            set_global_rng_state(local, self.device)
        else:
            say(f"the checkpoint was written by {len(local_states)} process(es), this run has "
                f"{self.ctx.world_size}: random streams restart, so results will differ from an uninterrupted run",
                self.talk)
        epochs_done, steps_done = state["epochs_done"], state["steps_into_epoch"]
        say(f"resuming {path} ({epochs_done} epoch(s) and {steps_done} step(s) done)", self.talk)
        return epochs_done, steps_done

    # -- the loop ------------------------------------------------------------------------------
    def train_epoch(self, parts: _Parts, epoch: int, first_step: int, images: Tensor, labels: Tensor,
                    signals: SignalStop) -> tuple[Optional[int], bool]:
        """Steps ``first_step..`` of ``epoch``; returns (the step to checkpoint mid-epoch or None, stop after)."""
        cfg, ctx, S, K = self.config, self.ctx, self.config.branches, parts.data.num_classes
        batch, steps = parts.batch, parts.steps_per_epoch
        parts.cot_weight.fill_(recipe.cot_weight_for_epoch(epoch, cfg.cot_weight, parts.cot_warmup_epochs))
        order = process_shard(epoch_order(len(labels), cfg.seed, epoch), ctx.rank, ctx.world_size)[: steps * batch]
        if self.device.type == "cuda":
            order = order.pin_memory().to(self.device, non_blocking=True)
        parts.net.train()
        stop = False
        with progress_bar(steps * cfg.batch_size, first_step * cfg.batch_size, f"epoch {epoch + 1}/{cfg.epochs}",
                          self.talk) as bar:
            for i in range(first_step, steps):
                index = order[i * batch:(i + 1) * batch]
                views, targets = parts.augmenter.training_batch(images.index_select(0, index),
                                                                labels.index_select(0, index), S, K)
                parts.step(to_model_layout(views, self.channels_last), targets)
                bar.update(cfg.batch_size)
                asked = signals.received is not None or (
                    self.should_stop is not None and self.should_stop(epoch, i + 1))
                stop = self.ctx.any(asked)  # every process stops at the same step
                if stop and i + 1 < steps:
                    return i + 1, True
        return None, stop

    def execute(self) -> TrainResult:
        cfg, ctx = self.config, self.ctx
        resume = self.find_resume_point()
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        parts = self.build()
        epochs_done, steps_done = self.restore(parts, *resume) if resume is not None else (0, 0)
        say(f"divco {__version__}: {cfg.model} x{cfg.branches} on {parts.info['dataset']}; {self.device}, "
            f"{ctx.world_size} process(es), {parts.steps_per_epoch} steps/epoch, lr {parts.info['base_lr']:.4g}, "
            f"wd {parts.info['weight_decay']:.3g}, {parts.info['precision']}; recipe {parts.info['resolved']['recipe']}: "
            f"lr warm-up {parts.info['resolved']['warmup_epochs']:g} epoch(s), co-training warm-up "
            f"{parts.info['resolved']['cot_warmup_epochs']} epoch(s)", self.talk)

        log = None
        if ctx.is_main:
            write_json(self.out / CONFIG_NAME, {**cfg.to_dict(), "resolved": parts.info["resolved"]})
            log = RunLog(self.out, tensorboard=cfg.tensorboard, epochs_done=epochs_done)
        result = TrainResult(out=self.out, epochs_done=epochs_done, history=list(log.records) if log else [],
                             final=None, info=parts.info)
        if log is not None and log.last is not None and "test_ensembles" in log.last:
            result.final = EvaluationResult.from_dict(log.last)
        best_path = self.out / BEST_NAME
        result.best_checkpoint = best_path if best_path.exists() else None

        device = self.device
        train_images, train_labels = parts.data.train_images.to(device), parts.data.train_labels.to(device)
        test_images, test_labels = parts.data.test_images.to(device), parts.data.test_labels.to(device)
        try:
            with SignalStop(announce=ctx.is_main) as signals:
                for epoch in range(epochs_done, cfg.epochs):
                    first = steps_done if epoch == epochs_done else 0
                    started = time.perf_counter()
                    stopped_at, stop = self.train_epoch(parts, epoch, first, train_images, train_labels, signals)
                    if stopped_at is not None:
                        return self.stop_mid_epoch(parts, result, signals, epoch, stopped_at, log)
                    record = self.finish_epoch(parts, epoch, first, started, test_images, test_labels)
                    result.epochs_done, result.final = epoch + 1, EvaluationResult.from_dict(record)
                    if ctx.is_main:
                        log.append(record)
                        result.history.append(record)
                        result.checkpoint = self.save_epoch(parts, epoch, record)
                        result.best_checkpoint = best_path if best_path.exists() else None
                        say(_epoch_line(record, cfg.epochs), self.talk)
                    else:
                        self.checkpoint_state(parts, epoch + 1, 0, record)  # joins the gather
                    ctx.barrier()
                    if (stop or ctx.any(signals.received is not None)) and epoch + 1 < cfg.epochs:
                        result.interrupted = signals.received or "stop request"
                        say(f"{result.interrupted}: stopped after epoch {epoch + 1} ({result.checkpoint}); "
                            f"continue with --resume", ctx.is_main)
                        return result
        finally:
            if log is not None:
                log.close()
        return result

    def finish_epoch(self, parts: _Parts, epoch: int, first_step: int, started: float, test_images: Tensor,
                     test_labels: Tensor) -> dict:
        """Read the epoch's training metrics (the one host read), evaluate, build the record."""
        cfg = self.config
        train_metrics = parts.step.metrics.read(self.ctx.metrics_group)
        parts.step.metrics.reset()
        elapsed = time.perf_counter() - started
        images_this_session = (parts.steps_per_epoch - first_step) * cfg.batch_size
        eval_started = time.perf_counter()
        evaluation = None
        if self.ctx.is_main:
            evaluation = evaluate(unwrap_model(parts.net), test_images, test_labels, parts.augmenter.normalize,
                                  batch_size=cfg.eval_batch_size or max(cfg.batch_size, 256),
                                  amp_dtype=parts.amp_dtype, channels_last=self.channels_last, backend=cfg.backend)
        evaluation = self.ctx.broadcast_object(evaluation)
        return {
            "epoch": epoch + 1,
            "lr": parts.schedule.current_lr(),
            "cot_weight": recipe.cot_weight_for_epoch(epoch, cfg.cot_weight, parts.cot_warmup_epochs),
            **train_metrics,
            **evaluation.to_dict(),
            "images_per_s": images_this_session / elapsed if elapsed > 0 else math.inf,
            "epoch_time_s": elapsed,
            "eval_time_s": time.perf_counter() - eval_started,
        }

    def save_epoch(self, parts: _Parts, epoch: int, record: dict) -> Path:
        """Checkpoint the end of ``epoch`` (rank 0), update best.pt, prune old checkpoints."""
        improved = self.best is None or record["test_ensemble_acc"] > self.best["test_ensemble_acc"]
        if improved:
            self.best = {"epoch": epoch + 1, "test_ensemble_acc": record["test_ensemble_acc"]}
        path = save_checkpoint(self.out / checkpoint_name(epoch + 1, 0),
                               self.checkpoint_state(parts, epoch + 1, 0, record))
        if improved:
            _link_or_copy(path, self.out / BEST_NAME)
        prune_checkpoints(self.out, self.config.keep_checkpoints)
        return path

    def stop_mid_epoch(self, parts: _Parts, result: TrainResult, signals: SignalStop, epoch: int, steps: int,
                       log: Optional[RunLog]) -> TrainResult:
        result.interrupted = signals.received or "stop request"
        state = self.checkpoint_state(parts, epoch, steps, log.last if log is not None else None)
        if self.ctx.is_main:
            result.checkpoint = save_checkpoint(self.out / checkpoint_name(epoch, steps), state)
            prune_checkpoints(self.out, self.config.keep_checkpoints)
            say(f"{result.interrupted}: saved {result.checkpoint} ({steps} step(s) into epoch {epoch + 1}); "
                f"continue with --resume")
        self.ctx.barrier()
        return result


def _epoch_line(record: dict, epochs: int) -> str:
    branches = " ".join(f"{100 * a:.2f}" for a in record["test_branch_acc"])
    return (f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}  test acc ensemble "
            f"{100 * record['test_ensemble_acc']:.2f} %  branches [{branches}]  NLL {record['test_nll']:.4f}  "
            f"{record['images_per_s']:.1f} img/s")


def _link_or_copy(source: Path, destination: Path) -> Path:
    """Make ``destination`` the same checkpoint as ``source``, atomically (a hard link where possible)."""
    with atomic_write_path(destination) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return destination


def spec_json(model: nn.Module) -> str:
    """One branch's architecture as JSON (the frozen ``spec`` dataclass), for checkpoints and exports."""
    spec = getattr(model, "spec", None)
    if spec is None or not dataclasses.is_dataclass(spec):
        return "{}"
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def train(config: TrainConfig, *, should_stop: Optional[StopRequest] = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; see :class:`TrainConfig`.

    ``should_stop(epoch, steps_done_in_epoch)`` is asked after every step: returning
    True stops the run there with a checkpoint, as SIGINT/SIGTERM do.  Under torchrun
    (WORLD_SIZE > 1) every process runs this and rank 0 writes the files.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"train expects a TrainConfig, got {type(config).__name__}")
    config.validate()
    ctx = DistributedContext.from_env(resolve_device(config.device).type)
    try:
        return _Run(config, ctx, should_stop).execute()
    finally:
        ctx.close()
