"""train(config): the divide-and-co-training loop, resumable to the last bit.

One process (or one per GPU under torchrun) runs::

    for each epoch:   co-training weight <- warm-up schedule
        for each batch of its shard:   S augmented views -> TrainStep (no host sync)
        read the epoch's metrics once, evaluate on the validation split and the test set,
        append to metrics.jsonl, write a checkpoint (atomic), keep the last N and the best

Everything random is drawn from generators whose state the checkpoint stores (torch
CPU/CUDA, numpy, python, the augmenter's), and the image order of an epoch is a pure
function of (seed, epoch). What differs between the training methods (``--method``: the lr
schedule, the batch order and targets, sample weights, member checkpoints, the co-training
weight) is asked of the run's method, a strategy object (divco.train.methods) that the
engine calls at fixed points. The plan (divco.train.plan.RunPlan) derives the steps, the
batch, the device and the precision once. So a run resumed from any
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
from .checkpoint import (
    BEST_NAME,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_name,
    find_resume_point,
    improved_best,
    prune_checkpoints,
    restore_best,
    save_checkpoint,
)
from .config import TrainConfig
from .cudnn import configure_cudnn
from .distributed import DistributedContext, convert_sync_batchnorm
from .evaluation import EvaluationResult, evaluate, evaluate_validation
from .export import spec_json
from .layout import TrainingLayout, make_layout
from .methods import TrainingMethod, method_class
from .plan import RunPlan, plan_run
from .recipe import parameter_groups
from .run_lock import LOCK_NAME, RunLock
from .branch_parallel.launch import check_processes_agree
from .run_checks import check_run_options
from .run_log import CONFIG_NAME, RunLog, warning, write_json
from .runtime import (
    SignalStop,
    global_rng_state,
    option,
    progress_bar,
    resolve_device,
    seed_everything,
    set_global_rng_state,
    status_line,
    to_model_layout,
)
from .schedules import StepSchedule
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
    check_run_options(config)  # what a run refuses, before any allocation or process group (also --print-config)
    processes = DistributedContext.from_env(resolve_device(config.device).type)
    try:
        check_processes_agree(config, processes)  # before the data, the model or any run folder
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
            self.lock = RunLock(self.out, announce=warning).acquire()
        except WriteError:
            raise
        except OSError as error:
            raise WriteError(f"cannot write in the run folder {self.out}: {error.strerror or error}") from None
        for leftover in remove_temporaries(self.out):  # of a killed process (the lock says none runs)
            warning(f"removed {leftover.name}, left by an interrupted write")
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
    if resume is not None and processes.is_main:  # a deleted best.pt belongs to the run: recreate it
        run.best = restore_best(run.out, run.best, epochs_done)
    run.report(_start_line(run))

    log = None
    if processes.is_main:
        write_json(run.out / CONFIG_NAME, {**config.to_dict(), "resolved": run.info["resolved"]})
        log = RunLog(run.out, tensorboard=config.tensorboard, epochs_done=epochs_done)
    result = _result_so_far(run, log, epochs_done)
    best_path = run.out / BEST_NAME

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
                if epoch + 1 == config.epochs:
                    run.method.end_training(run)
                record = finish_epoch(run, epoch, first, started, test_images, test_labels)
                run.method.after_epoch(run, epoch, record, train_images, train_labels)
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


def _start_line(run: "Run") -> str:
    config, info = run.config, run.info
    return (f"divco {__version__}: {config.model} x{config.branches} on {info['dataset']}; {run.device}, "
            f"{run.layout.describe()}, {run.steps_per_epoch} steps/epoch, lr "
            f"{info['base_lr']:.4g}, wd {info['weight_decay']:.3g}, {info['precision']}; recipe "
            f"{info['resolved']['recipe']}: {run.method.schedule_summary(run.plan)}, "
            f"{run.method.cotrain_summary(run.plan)}")


def _result_so_far(run: "Run", log: Optional[RunLog], epochs_done: int) -> TrainResult:
    """The result of the epochs already done (of a resumed run: its records, last metrics and best.pt)."""
    result = TrainResult(out=run.out, epochs_done=epochs_done, history=list(log.records) if log else [],
                         final=None, info=run.info)
    if log is not None and log.last is not None and "test_ensembles" in log.last:
        result.final = EvaluationResult.from_dict(log.last)
    best_path = run.out / BEST_NAME
    result.best_checkpoint = best_path if best_path.exists() else None
    return result


# -- assembling a run --------------------------------------------------------------------------------


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
    best: Optional[dict] = None  # {"epoch", "selected_on", <that metric>} of best.pt (checkpoint.improved_best)

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
    single_process = method_class(config.method).single_process
    if single_process and processes.enabled:
        raise ValueError(f"method {config.method!r} runs on one process ({single_process}); this launch has "
                         f"{processes.world_size}: run it without torchrun")
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
                     cot_kind=config.cot_kind, temperature=config.temperature, backend=config.backend,
                     scheduler=schedule, amp_dtype=plan.amp_dtype, scaler=scaler, compile=config.compile,
                     on_nonfinite=config.on_nan, capture=config.capture, **method.step_options())
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


def restore(run: Run, path: Path, state: dict) -> tuple[int, int]:
    """Load a checkpoint into the run; return (epochs done, steps done in the next epoch)."""
    epochs_done, steps_done = state["epochs_done"], state["steps_into_epoch"]
    if epochs_done > run.config.epochs or steps_done >= run.steps_per_epoch or \
            (epochs_done == run.config.epochs and steps_done):
        raise ValueError(f"{path} is not a divco checkpoint of this run: it says {epochs_done} epoch(s) and "
                         f"{steps_done} step(s) done, the run has {run.config.epochs} epoch(s) of "
                         f"{run.steps_per_epoch} step(s)")
    run.layout.load_state(unwrap_model(run.net), run.optimizer, state["model"], state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.best = state.get("best")
    run.method.load_state_dict(run, state.get("checkpoint_ensemble"))
    local_states = state["local_states"]
    local = run.layout.local_state(state)
    if local is not None:
        run.augmenter.load_state_dict(local["augmenter"])
        run.step.metrics.load_state_dict(local["partial_metrics"])
        set_global_rng_state(local, run.device)
    else:
        run.report(f"the checkpoint was written by {len(local_states)} process(es) "
                   f"(--branch-parallel {state.get('branch_parallel', 1)}), this run has {run.layout.data_parallel} "
                   f"data shard(s): random streams restart, so results will differ from an "
                   f"uninterrupted run")
    run.report(f"resuming {path} ({epochs_done} epoch(s) and {steps_done} step(s) done)")
    return epochs_done, steps_done


# -- an epoch ----------------------------------------------------------------------------------------


def train_epoch(run: Run, epoch: int, first_step: int, images: Tensor, labels: Tensor, signals: SignalStop,
                should_stop: Optional[StopRequest]) -> tuple[Optional[int], bool]:
    """Steps ``first_step..`` of ``epoch``; returns (the step to checkpoint mid-epoch or None, stop after)."""
    config, processes, method = run.config, run.processes, run.method
    steps = run.steps_per_epoch
    run.cot_weight.fill_(method.cot_weight(run.plan, epoch))
    order = method.epoch_order(run.plan, epoch, run.layout.data_rank, run.layout.data_parallel)
    if run.device.type == "cuda":
        order = order.pin_memory().to(run.device, non_blocking=True)
    run.net.train()
    stop = False
    with progress_bar(steps * config.batch_size, first_step * config.batch_size,
                      f"epoch {epoch + 1}/{config.epochs}", run.verbose) as bar:
        for i in range(first_step, steps):
            views, targets, step_options = method.batch(run, images, labels, order, i)
            run.step(to_model_layout(run.layout.model_inputs(views), run.channels_last), targets, **step_options)
            bar.update(config.batch_size)
            method.after_step(run, epoch, i, epoch * steps + i + 1)
            asked = signals.received is not None or (should_stop is not None and should_stop(epoch, i + 1))
            stop = processes.any(asked)  # every process stops at the same step
            if stop and i + 1 < steps:
                return i + 1, True
    return None, stop


def finish_epoch(run: Run, epoch: int, first_step: int, started: float, test_images: Tensor,
                 test_labels: Tensor) -> dict:
    """Read the epoch's training metrics (the one host read), evaluate, build the record."""
    config = run.config
    train_metrics = run.step.metrics.read(run.layout.metrics_group)
    run.step.metrics.reset()
    elapsed = time.perf_counter() - started
    images_this_session = (run.steps_per_epoch - first_step) * config.batch_size
    eval_started = time.perf_counter()
    evaluation = validation = None
    options = dict(batch_size=config.eval_batch_size or max(config.batch_size, 256), amp_dtype=run.amp_dtype,
                   channels_last=run.channels_last, backend=config.backend)
    model = run.layout.evaluation_model(run.method.model_to_evaluate(run))  # None: not on this process
    if model is not None:
        evaluation = evaluate(model, test_images, test_labels, run.augmenter.normalize, **options)
        validation = evaluate_validation(model, run.data, run.augmenter.normalize, run.device,
                                         **options)  # best.pt is chosen on it (checkpoint.improved_best)
    evaluation, validation = run.processes.broadcast_object((evaluation, validation))
    return {
        "epoch": epoch + 1,
        "lr": run.schedule.current_lr(),
        "cot_weight": run.method.cot_weight(run.plan, epoch),
        **train_metrics,
        **evaluation.to_dict(),
        **validation,
        "images_per_s": images_this_session / elapsed if elapsed > 0 else math.inf,
        "epoch_time_s": elapsed,
        "eval_time_s": time.perf_counter() - eval_started,
    }


# -- checkpoints -------------------------------------------------------------------------------------


def save_epoch(run: Run, epoch: int, record: dict, keep_older: bool = False) -> Path:
    """Checkpoint the end of ``epoch`` (rank 0), update best.pt, prune old checkpoints (unless keep_older)."""
    improved = improved_best(run.best, record)  # on the validation split (the test set without one)
    run.best = improved or run.best
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
    config, data, net = run.config, run.data, unwrap_model(run.net)
    model_state, optimizer_state = run.layout.full_state(net, run.optimizer)  # collective: the one-process state
    if not run.processes.is_main:
        return None
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "divco_version": __version__,
        "torch_version": str(torch.__version__), "config": config.to_dict(), "device_type": run.device.type,
        "epochs_done": epochs_done, "steps_into_epoch": steps,
        "model_info": {"name": config.model, "branches": config.branches, "num_classes": data.num_classes,
                       "model_kwargs": config.model_kwargs, "family": getattr(net, "family", ""),
                       "spec": spec_json(net)},
        "dataset": {"name": data.name, "source": data.source, "classes": list(data.classes),
                    "mean": list(data.mean), "std": list(data.std), "image_size": list(data.image_size)},
        "model": model_state, "optimizer": optimizer_state,
        "schedule": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "best": run.best, "world_size": run.processes.world_size,
        "branch_parallel": run.layout.branch_groups, "local_states": local_states,
        "last_record": last_record,
        "checkpoint_ensemble": run.method.state_dict(run),
    }


def _local_state(run: Run) -> dict:
    """What each process must restore to continue bit-exactly (gathered to rank 0)."""
    return {"augmenter": run.augmenter.state_dict(), "partial_metrics": run.step.metrics.state_dict(),
            **global_rng_state(run.device)}


def _epoch_line(record: dict, epochs: int) -> str:
    branches = " ".join(f"{100 * a:.2f}" for a in record["test_branch_acc"])
    validation = f"val acc {100 * record['val_ensemble_acc']:.2f} %  " if "val_ensemble_acc" in record else ""
    return (f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}  {validation}test acc ensemble "
            f"{100 * record['test_ensemble_acc']:.2f} %  branches [{branches}]  NLL {record['test_nll']:.4f}  "
            f"{record['images_per_s']:.1f} img/s")
