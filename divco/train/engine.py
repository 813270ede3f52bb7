"""train(config): the divide-and-co-training loop, resumable to the last bit.

One process (or one per GPU under torchrun) runs::

    for each epoch:   co-training weight <- warm-up schedule
        for each batch of its shard:   S augmented views -> TrainStep (no host sync)
        read the epoch's metrics once, evaluate on the test set,
        append to metrics.jsonl, write a checkpoint (atomic), keep the last N and the best

Everything random is drawn from generators whose state the checkpoint stores (torch
CPU/CUDA, numpy, python, the augmenter's), and the image order of an epoch is a pure
function of (seed, epoch). ``--method snapshot|cbnn`` also take member checkpoints
(divco.train.members: after a snapshot cycle's last step, after a cbnn interval's last epoch)
and cbnn weighs each image's loss by its boosting weight. So a run resumed from any
checkpoint - also one written by SIGINT/SIGTERM in the middle of an epoch - computes what
the uninterrupted run computes.
"""

from __future__ import annotations

import math
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
from ..io import WriteError, atomic_link_or_copy, remove_temporaries
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
from .evaluation import EvaluationResult, evaluate, predict
from .export import spec_json
from .members import CheckpointEnsemble, SnapshotLR
from .run_lock import LOCK_NAME, RunLock
from .run_log import CONFIG_NAME, RunLog, write_json
from .runtime import (
    SignalStop,
    branch_epoch_orders,
    epoch_order,
    global_rng_state,
    option,
    process_shard,
    progress_bar,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_global_rng_state,
    status_line,
    to_model_layout,
)
from .step import TrainStep, unwrap_model

#: Record fields that measure the machine, not the run (they differ between identical runs).
TIMING_FIELDS = ("images_per_s", "epoch_time_s", "eval_time_s")

#: TrainResult.interrupted of a run stopped because its loss became NaN or infinite (on_nan="stop").
NONFINITE_STOP = "non-finite loss"

#: ``should_stop(epoch, steps_done_in_epoch) -> bool``, asked after every step.
StopRequest = Callable[[int, int], bool]


@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    history: list[dict]  # metrics.jsonl records, epoch 1 onwards (on the main process)
    final: Optional[EvaluationResult]  # test metrics after the last epoch done
    interrupted: Optional[str] = None  # "SIGTERM", "SIGINT", "stop request" or NONFINITE_STOP when stopped early
    checkpoint: Optional[Path] = None  # the last checkpoint written
    best_checkpoint: Optional[Path] = None
    info: dict = field(default_factory=dict)  # dataset, device, steps per epoch, lr, weight decay, params

    @property
    def completed(self) -> bool:
        return self.interrupted is None


def train(config: TrainConfig, *, should_stop: Optional[StopRequest] = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; see :class:`TrainConfig`.

    ``should_stop(epoch, steps_done_in_epoch)`` is asked after every step: returning
    True stops the run there with a checkpoint, as SIGINT/SIGTERM do.  Under torchrun
    (WORLD_SIZE > 1) every process runs this and rank 0 writes the files.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"train expects a TrainConfig, got {type(config).__name__}")
    config.validate()
    processes = DistributedContext.from_env(resolve_device(config.device).type)
    try:
        out = Path(config.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{option('out')} must be a folder, got the file {out}")
        if not processes.is_main:  # rank 0 holds the run folder's lock for all
            return train_in_folder(config, processes, should_stop)
        with locked_run_folder(out, verbose=config.progress):
            return train_in_folder(config, processes, should_stop)
    finally:
        processes.close()


class locked_run_folder:  # noqa: N801 - used as a context manager, like open()
    """Create ``out`` if needed, hold its lock, remove leftover temporaries; on failure remove what it created."""

    def __init__(self, out: Path, *, verbose: bool) -> None:
        self.out, self.verbose = out, verbose
        self.created = not out.exists()
        self.lock: Optional[RunLock] = None

    def __enter__(self) -> Path:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.out, announce=lambda line: status_line(line, self.verbose)).acquire()
        except WriteError:
            raise
        except OSError as error:
            raise WriteError(f"cannot write in the run folder {self.out}: {error.strerror or error}") from None
        for leftover in remove_temporaries(self.out):  # of a killed process (the lock says none runs)
            status_line(f"removed {leftover.name}, left by an interrupted write", self.verbose)
        return self.out

    def __exit__(self, kind, error, traceback) -> None:
        self.lock.release()
        # a failed start leaves no new empty run folder
        if kind is not None and self.created and all(p.name == LOCK_NAME for p in self.out.iterdir()):
            shutil.rmtree(self.out, ignore_errors=True)


def train_in_folder(config: TrainConfig, processes: DistributedContext,
                    should_stop: Optional[StopRequest]) -> TrainResult:
    """The training loop of one process: resume point, assembly, epochs, records and checkpoints."""
    device = resolve_device(config.device, processes.local_rank)
    resume = find_resume_point(config, device, verbose=processes.is_main and config.progress)
    processes.barrier()
    run = assemble_run(config, processes, device)
    epochs_done, steps_done = restore(run, *resume) if resume is not None else (0, 0)
    run.report(f"divco {__version__}: {config.model} x{config.branches} on {run.info['dataset']}; {device}, "
               f"{processes.world_size} process(es), {run.steps_per_epoch} steps/epoch, lr "
               f"{run.info['base_lr']:.4g}, wd {run.info['weight_decay']:.3g}, {run.info['precision']}; recipe "
               f"{run.info['resolved']['recipe']}: "
               + (f"{config.members} snapshot cycles (no lr warm-up), " if config.method == "snapshot" else
                  f"lr warm-up {run.info['resolved']['warmup_epochs']:g} epoch(s), ")
               + f"co-training warm-up {run.info['resolved']['cot_warmup_epochs']} epoch(s)")

    log = None
    if processes.is_main:
        write_json(run.out / CONFIG_NAME, {**config.to_dict(), "resolved": run.info["resolved"]})
        log = RunLog(run.out, tensorboard=config.tensorboard, epochs_done=epochs_done)
    result = TrainResult(out=run.out, epochs_done=epochs_done, history=list(log.records) if log else [],
                         final=None, info=run.info)
    if log is not None and log.last is not None and "test_ensembles" in log.last:
        result.final = EvaluationResult.from_dict(log.last)
    best_path = run.out / BEST_NAME
    result.best_checkpoint = best_path if best_path.exists() else None

    train_images, train_labels = run.data.train_images.to(device), run.data.train_labels.to(device)
    test_images, test_labels = run.data.test_images.to(device), run.data.test_labels.to(device)
    try:
        with SignalStop(announce=processes.is_main) as signals:
            for epoch in range(epochs_done, config.epochs):
                first = steps_done if epoch == epochs_done else 0
                started = time.perf_counter()
                stopped_at, stop = train_epoch(run, epoch, first, train_images, train_labels, signals, should_stop)
                if stopped_at is not None:
                    return stop_mid_epoch(run, result, signals, epoch, stopped_at, log)
                record = finish_epoch(run, epoch, first, started, test_images, test_labels)
                if run.members is not None and run.members.boosting_due(epoch + 1):
                    boosting = boosting_round(run, train_images, train_labels)
                    take_member(run, epoch + 1, 0, (epoch + 1) * run.steps_per_epoch, boosting, record)
                    record["cbnn_alpha"], record["cbnn_error"] = boosting["alpha"], boosting["error"]
                result.epochs_done, result.final = epoch + 1, EvaluationResult.from_dict(record)
                diverged = config.on_nan == "stop" and record["train_nonfinite_steps"] > 0
                last_good = result.checkpoint or (resume[0] if resume is not None else None)
                if processes.is_main:
                    log.append(record)
                    result.history.append(record)
                    result.checkpoint = save_epoch(run, epoch, record, keep_older=diverged)
                    result.best_checkpoint = best_path if best_path.exists() else None
                    run.report(_epoch_line(record, config.epochs))
                else:
                    checkpoint_state(run, epoch + 1, 0, record)  # joins the gather
                processes.barrier()
                if diverged:
                    result.interrupted = NONFINITE_STOP
                    status_line(f"the loss became NaN at epoch {epoch + 1} step "
                                f"{record['train_first_nonfinite_step']}; last good checkpoint: "
                                f"{last_good or 'none (the first epoch diverged)'}", processes.is_main)
                    return result
                if (stop or processes.any(signals.received is not None)) and epoch + 1 < config.epochs:
                    result.interrupted = signals.received or "stop request"
                    status_line(f"{result.interrupted}: stopped after epoch {epoch + 1} ({result.checkpoint}); "
                                f"continue with {option('resume', True)}", processes.is_main)
                    return result
    finally:
        if log is not None:
            log.close()
    return result


# -- assembling a run --------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a run trains with, assembled once by :func:`assemble_run`."""

    config: TrainConfig
    processes: DistributedContext
    device: torch.device
    channels_last: bool
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
    best: Optional[dict] = None  # {"epoch", "test_ensemble_acc"} of best.pt
    members: Optional[CheckpointEnsemble] = None  # snapshot / cbnn: the member checkpoints and sample weights

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def verbose(self) -> bool:
        """Status lines and progress bars: on the main process, unless progress is off."""
        return self.processes.is_main and self.config.progress

    def report(self, line: str) -> None:
        status_line(line, self.verbose)


def find_resume_point(config: TrainConfig, device: torch.device, *, verbose: bool) -> Optional[tuple[Path, dict]]:
    """The checkpoint to resume, or None for a new run; refuses to overwrite a run."""
    out = Path(config.out)
    existing = list_checkpoints(out)
    if not config.resume:
        if existing or (out / "metrics.jsonl").exists():
            raise ValueError(f"{out} already holds a training run; pass {option('resume', True)} to "
                             f"continue it, or choose another {option('out')}")
        return None
    if not existing:
        status_line(f"no checkpoint in {out}: starting a new run", verbose)
        return None
    path, state = load_latest(out)
    differences = TrainConfig.from_dict(state["config"]).run_defining_differences(config)
    written_on = state.get("device_type", device.type)  # the device's type changes the numbers
    if written_on != device.type:
        differences.append(f"a {device.type} device (this run: {written_on})")
    if differences:
        raise ValueError(f"cannot resume {path}: it was trained with different options; this command gives "
                         + "; ".join(differences) + f". Use the run's original options, or choose another "
                         f"{option('out')}")
    return path, state


def assemble_run(config: TrainConfig, processes: DistributedContext, device: torch.device) -> Run:
    """Data, model, optimiser, schedule, step and augmenter of a run (seeded: the same every time)."""
    if config.batch_size % processes.world_size:
        raise ValueError(f"batch_size {config.batch_size} is the global batch and must be divisible by the "
                         f"{processes.world_size} processes")
    batch = config.batch_size // processes.world_size
    if config.checkpoint_ensemble and processes.enabled:
        raise ValueError(f"method {config.method!r} runs on one process (its members and sample weights are not "
                         f"sharded yet); this launch has {processes.world_size}: run it without torchrun")
    amp_dtype, needs_scaler = resolve_precision(config.precision, device)
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    seed_everything(config.seed)
    data = _load_data(config, processes)
    per_process = len(data.train_labels) // processes.world_size
    steps_per_epoch = per_process // batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data.train_labels)} training images "
                         f"({per_process} per process); lower {option('batch_size')}")

    net = _build_model(config, processes, device, data.num_classes, channels_last)
    resolved = recipe.resolve(config, recipe.recipe_name(config, identify_loaded_dataset(config.data, data)))
    weight_decay, base_lr = resolved.weight_decay, resolved.lr
    optimizer = torch.optim.SGD(
        recipe.parameter_groups(net, weight_decay, exempt_all_norms=resolved.exempt_all_norms), lr=base_lr,
        momentum=resolved.momentum, nesterov=config.nesterov)
    total_steps = config.epochs * steps_per_epoch
    if config.method == "snapshot":  # M cosine cycles with restarts instead of the recipe's schedule
        if config.members > total_steps:
            raise ValueError(f"{config.members} snapshot cycles need at least {config.members} steps; this run has "
                             f"{total_steps}: lower {option('checkpoints')} or {option('batch_size')}")
        schedule = SnapshotLR(optimizer, base_lr=base_lr, total_steps=total_steps, cycles=config.members)
    else:
        schedule = recipe.WarmupCosineSchedule(
            optimizer, base_lr=base_lr, total_steps=total_steps,
            warmup_steps=recipe.warmup_steps(resolved.warmup_epochs, steps_per_epoch, total_steps),
            warmup_start_lr=resolved.warmup_start_lr, min_lr=resolved.min_lr)
    members = None
    if config.checkpoint_ensemble:
        members = CheckpointEnsemble(config.method, config.members, total_steps=total_steps, epochs=config.epochs,
                                     num_samples=len(data.train_labels), num_classes=data.num_classes,
                                     shrinkage=config.cbnn_shrinkage, error_kind=config.cbnn_errors, device=device,
                                     weight_ratio=config.cbnn_weight_ratio)
    cot_warmup = resolved.cot_warmup_epochs
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    cot_weight = torch.zeros((), dtype=torch.float32, device=device)

    train_model: nn.Module = net
    if processes.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    step = TrainStep(train_model, optimizer, cot_weight=cot_weight, branches=config.branches,
                     cot_kind=config.cot_kind, temperature=config.temperature, backend=config.backend,
                     scheduler=schedule, amp_dtype=amp_dtype, scaler=scaler, compile=config.compile,
                     on_nonfinite=config.on_nan, independent=config.method == "independent")
    # every process draws its own augmentations
    augment_seed = int(np.random.SeedSequence([config.seed, processes.rank]).generate_state(1)[0])
    augmenter = BatchAugmenter(resolved.augment_config(), data.mean, data.std, device, seed=augment_seed,
                               label_smoothing=resolved.label_smoothing)
    info = {
        "dataset": data.describe(), "device": str(device), "processes": processes.world_size,
        "steps_per_epoch": steps_per_epoch, "base_lr": base_lr, "weight_decay": weight_decay,
        "cot_warmup_epochs": cot_warmup, "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "channels_last": channels_last, "execution": unwrap_model(net).execution,
        "params": sum(p.numel() for p in net.parameters()),
        "resolved": resolved.to_dict(),  # every recipe value used (warm-ups included); also in config.json
    }
    return Run(config, processes, device, channels_last, data, net, optimizer, schedule, scaler, cot_weight,
               cot_warmup, step, augmenter, batch, steps_per_epoch, amp_dtype, info, members=members)


def _load_data(config: TrainConfig, processes: DistributedContext) -> ImageDataset:
    if not processes.is_main:  # rank 0 decodes and writes the cache; the others then read it
        processes.barrier()
    data = load_dataset(config.data, image_size=config.image_size, cache_dir=config.cache_dir)
    if processes.is_main:
        processes.barrier()
    return data.subset(config.train_subset, config.test_subset)


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


def restore(run: Run, path: Path, state: dict) -> tuple[int, int]:
    """Load a checkpoint into the run; return (epochs done, steps done in the next epoch)."""
    epochs_done, steps_done = state["epochs_done"], state["steps_into_epoch"]
    if epochs_done > run.config.epochs or steps_done >= run.steps_per_epoch or \
            (epochs_done == run.config.epochs and steps_done):
        raise ValueError(f"{path} is not a divco checkpoint of this run: it says {epochs_done} epoch(s) and "
                         f"{steps_done} step(s) done, the run has {run.config.epochs} epoch(s) of "
                         f"{run.steps_per_epoch} step(s)")
    unwrap_model(run.net).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.best = state.get("best")
    if run.members is not None:
        run.members.load_state_dict(state.get("checkpoint_ensemble"))
        if run.processes.is_main:  # members taken after this checkpoint are taken again, identically
            run.members.write_record(run.out)
    local_states = state["local_states"]
    if len(local_states) == run.processes.world_size:
        local = local_states[run.processes.rank]
        run.augmenter.load_state_dict(local["augmenter"])
        run.step.metrics.load_state_dict(local["partial_metrics"])
        set_global_rng_state(local, run.device)
    else:
        run.report(f"the checkpoint was written by {len(local_states)} process(es), this run has "
                   f"{run.processes.world_size}: random streams restart, so results will differ from an "
                   f"uninterrupted run")
    run.report(f"resuming {path} ({epochs_done} epoch(s) and {steps_done} step(s) done)")
    return epochs_done, steps_done


# -- an epoch ----------------------------------------------------------------------------------------


def train_epoch(run: Run, epoch: int, first_step: int, images: Tensor, labels: Tensor, signals: SignalStop,
                should_stop: Optional[StopRequest]) -> tuple[Optional[int], bool]:
    """Steps ``first_step..`` of ``epoch``; returns (the step to checkpoint mid-epoch or None, stop after)."""
    config, processes = run.config, run.processes
    S, K, batch, steps = config.branches, run.data.num_classes, run.batch, run.steps_per_epoch
    run.cot_weight.fill_(_cot_weight(run, epoch))
    independent = config.method == "independent"
    if independent:  # [S, steps * batch]: every branch its own order of the training set
        order = torch.stack([process_shard(o, processes.rank, processes.world_size)[: steps * batch]
                             for o in branch_epoch_orders(len(labels), config.seed, epoch, S)])
    else:
        order = process_shard(epoch_order(len(labels), config.seed, epoch), processes.rank,
                              processes.world_size)[: steps * batch]
    if run.device.type == "cuda":
        order = order.pin_memory().to(run.device, non_blocking=True)
    run.net.train()
    stop = False
    with progress_bar(steps * config.batch_size, first_step * config.batch_size,
                      f"epoch {epoch + 1}/{config.epochs}", run.verbose) as bar:
        for i in range(first_step, steps):
            if independent:
                views, targets = _independent_batch(run, images, labels, order[:, i * batch:(i + 1) * batch], K)
            else:
                index = order[i * batch:(i + 1) * batch]
                views, targets = run.augmenter.training_batch(images.index_select(0, index),
                                                              labels.index_select(0, index), S, K)
            weights = {} if run.members is None or independent else {"sample_weight": run.members.batch_weights(index)}
            run.step(to_model_layout(views, run.channels_last), targets, **weights)
            bar.update(config.batch_size)
            iteration = epoch * steps + i + 1
            if run.members is not None and run.members.snapshot_due(iteration):
                ends_epoch = i + 1 == steps
                take_member(run, epoch + 1 if ends_epoch else epoch, 0 if ends_epoch else i + 1, iteration)
            asked = signals.received is not None or (should_stop is not None and should_stop(epoch, i + 1))
            stop = processes.any(asked)  # every process stops at the same step
            if stop and i + 1 < steps:
                return i + 1, True
    return None, stop


def _independent_batch(run: Run, images: Tensor, labels: Tensor, index: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Views ``[B, S, 3, H, W]`` and targets ``[B, S]`` / ``[B, S, K]``: branch s gets the images of its
    own order ``index[s]``, augmented (and mixed up) on their own, as a separate run would."""
    per_branch = [run.augmenter.training_batch(images.index_select(0, rows), labels.index_select(0, rows), 1, K)
                  for rows in index]
    return torch.cat([v for v, _ in per_branch], dim=1), torch.stack([t for _, t in per_branch], dim=1)


def _cot_weight(run: Run, epoch: int) -> float:
    """The co-training weight of an epoch: 0 for independent training, else the warmed-up schedule."""
    if run.config.method == "independent":
        return 0.0
    return recipe.cot_weight_for_epoch(epoch, run.config.cot_weight, run.cot_warmup_epochs)


def finish_epoch(run: Run, epoch: int, first_step: int, started: float, test_images: Tensor,
                 test_labels: Tensor) -> dict:
    """Read the epoch's training metrics (the one host read), evaluate, build the record."""
    config = run.config
    train_metrics = run.step.metrics.read(run.processes.metrics_group)
    run.step.metrics.reset()
    elapsed = time.perf_counter() - started
    images_this_session = (run.steps_per_epoch - first_step) * config.batch_size
    eval_started = time.perf_counter()
    evaluation = None
    if run.processes.is_main:
        evaluation = evaluate(unwrap_model(run.net), test_images, test_labels, run.augmenter.normalize,
                              batch_size=config.eval_batch_size or max(config.batch_size, 256),
                              amp_dtype=run.amp_dtype, channels_last=run.channels_last, backend=config.backend)
    evaluation = run.processes.broadcast_object(evaluation)
    return {
        "epoch": epoch + 1,
        "lr": run.schedule.current_lr(),
        "cot_weight": _cot_weight(run, epoch),
        **train_metrics,
        **evaluation.to_dict(),
        "images_per_s": images_this_session / elapsed if elapsed > 0 else math.inf,
        "epoch_time_s": elapsed,
        "eval_time_s": time.perf_counter() - eval_started,
    }


# -- members of a checkpoint ensemble (snapshot, cbnn) --------------------------------------------------


def boosting_round(run: Run, train_images: Tensor, train_labels: Tensor) -> dict:
    """CBNN: the model (eval mode) predicts the un-augmented training set; the round's alpha and weights."""
    logits = predict(unwrap_model(run.net), train_images, run.augmenter.normalize,
                     batch_size=run.config.eval_batch_size or max(run.config.batch_size, 256),
                     amp_dtype=run.amp_dtype, channels_last=run.channels_last)
    boosting = run.members.boosting_round(logits, train_labels)
    run.report(f"cbnn member {len(run.members.taken) + 1}/{run.members.count}: weighted training error "
               f"{boosting['error']:.4f}, alpha {boosting['alpha']:.4f}")
    return boosting


def take_member(run: Run, epochs_done: int, steps: int, iteration: int, boosting: Optional[dict] = None,
                record: Optional[dict] = None) -> None:
    """Write the next member checkpoint (single process: snapshot/cbnn refuse distributed runs)."""
    state = checkpoint_state(run, epochs_done, steps, record)
    path = run.members.take(run.out, state, epochs_done=epochs_done, steps=steps, iteration=iteration,
                            boosting=boosting)
    run.report(f"member {len(run.members.taken)}/{run.members.count}: {path.name} (iteration {iteration})")


# -- checkpoints -------------------------------------------------------------------------------------


def save_epoch(run: Run, epoch: int, record: dict, keep_older: bool = False) -> Path:
    """Checkpoint the end of ``epoch`` (rank 0), update best.pt, prune old checkpoints (unless keep_older)."""
    finite = math.isfinite(record["train_loss"]) and record["train_nonfinite_steps"] == 0
    improved = finite and (run.best is None or record["test_ensemble_acc"] > run.best["test_ensemble_acc"])
    if improved:
        run.best = {"epoch": epoch + 1, "test_ensemble_acc": record["test_ensemble_acc"]}
    path = save_checkpoint(run.out / checkpoint_name(epoch + 1, 0), checkpoint_state(run, epoch + 1, 0, record))
    if improved:
        atomic_link_or_copy(path, run.out / BEST_NAME)
    if not keep_older:
        prune_checkpoints(run.out, run.config.keep_checkpoints)
    return path


def stop_mid_epoch(run: Run, result: TrainResult, signals: SignalStop, epoch: int, steps: int,
                   log: Optional[RunLog]) -> TrainResult:
    result.interrupted = signals.received or "stop request"
    state = checkpoint_state(run, epoch, steps, log.last if log is not None else None)
    if run.processes.is_main:
        result.checkpoint = save_checkpoint(run.out / checkpoint_name(epoch, steps), state)
        prune_checkpoints(run.out, run.config.keep_checkpoints)
        status_line(f"{result.interrupted}: saved {result.checkpoint} ({steps} step(s) into epoch {epoch + 1}); "
                    f"continue with {option('resume', True)}")
    run.processes.barrier()
    return result


def checkpoint_state(run: Run, epochs_done: int, steps: int, last_record: Optional[dict]) -> Optional[dict]:
    """The checkpoint of this moment on rank 0 (None elsewhere); every process must call it."""
    local_states = run.processes.gather_objects(_local_state(run))
    if not run.processes.is_main:
        return None
    config, data, net = run.config, run.data, unwrap_model(run.net)
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "divco_version": __version__,
        "torch_version": str(torch.__version__), "config": config.to_dict(), "device_type": run.device.type,
        "epochs_done": epochs_done, "steps_into_epoch": steps,
        "model_info": {"name": config.model, "branches": config.branches, "num_classes": data.num_classes,
                       "model_kwargs": config.model_kwargs, "family": getattr(net, "family", ""),
                       "spec": spec_json(net)},
        "dataset": {"name": data.name, "source": data.source, "classes": list(data.classes),
                    "mean": list(data.mean), "std": list(data.std), "image_size": list(data.image_size)},
        "model": net.state_dict(), "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "best": run.best, "world_size": run.processes.world_size, "local_states": local_states,
        "last_record": last_record,
        "checkpoint_ensemble": run.members.state_dict() if run.members is not None else None,
    }


def _local_state(run: Run) -> dict:
    """What each process must restore to continue bit-exactly (gathered to rank 0)."""
    return {"augmenter": run.augmenter.state_dict(), "partial_metrics": run.step.metrics.state_dict(),
            **global_rng_state(run.device)}


def _epoch_line(record: dict, epochs: int) -> str:
    branches = " ".join(f"{100 * a:.2f}" for a in record["test_branch_acc"])
    return (f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}  test acc ensemble "
            f"{100 * record['test_ensemble_acc']:.2f} %  branches [{branches}]  NLL {record['test_nll']:.4f}  "
            f"{record['images_per_s']:.1f} img/s")
