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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import __version__
from .assembly import Run, assemble_run
from .best_checkpoint import restore_best
from .checkpoint import BEST_NAME, find_resume_point
from .config import TrainConfig
from .distributed import DistributedContext
from .epoch import StopRequest, finish_epoch, train_epoch
from .evaluation import EvaluationResult
from .run_checkpoint import checkpoint_state, restore, save_epoch, stop_mid_epoch
from .branch_parallel.launch import check_processes_agree
from .run_checks import check_run_options
from .run_folder import locked_run_folder
from .run_log import CONFIG_NAME, RunLog, write_json
from .runtime import SignalStop, option, resolve_device, status_line

# What the engine's parts export, importable from here as before the split:
__all__ = ["NONFINITE_STOP", "TIMING_FIELDS", "Run", "StopRequest", "TrainResult", "assemble_run", "checkpoint_state",
           "finish_epoch", "locked_run_folder", "restore", "save_epoch", "stop_mid_epoch", "train", "train_epoch",
           "train_in_folder"]

#: Record fields that measure the machine, not the run (they differ between identical runs).
TIMING_FIELDS = ("images_per_s", "epoch_time_s", "eval_time_s")

#: TrainResult.interrupted of a run stopped because its loss became NaN or infinite (on_nan="stop").
NONFINITE_STOP = "non-finite loss"

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

    train_images, train_labels = run.data.train_images.to(device), run.data.train_labels.to(device)
    test_images, test_labels = run.data.test_images.to(device), run.data.test_labels.to(device)
    try:
        with SignalStop(announce=processes.is_main) as signals:
            for epoch in range(epochs_done, config.epochs):
                first = steps_done if epoch == epochs_done else 0
                started = time.perf_counter()
                stopped_at, stop = train_epoch(run, epoch, first, train_images, train_labels, signals, should_stop)
                if stopped_at is not None:
                    result.interrupted = signals.received or "stop request"
                    result.checkpoint = stop_mid_epoch(run, result.interrupted, epoch, stopped_at,
                                                       log.last if log is not None else None)
                    return result
                if epoch + 1 == config.epochs:
                    run.method.end_training(run)
                record = finish_epoch(run, epoch, first, started, test_images, test_labels)
                run.method.after_epoch(run, epoch, record, train_images, train_labels)
                last_good = result.checkpoint or (resume[0] if resume is not None else None)
                if _end_epoch(run, result, log, epoch, record, stop, signals, last_good):
                    return result
    finally:
        if log is not None:
            log.close()
    return result


def _end_epoch(run: Run, result: TrainResult, log: Optional[RunLog], epoch: int, record: dict, stop: bool,
               signals: SignalStop, last_good: Optional[Path]) -> bool:
    """Record and checkpoint ``epoch`` (every process joins); True when the run stops after it (diverged, or
    a stop request or signal before the last epoch)."""
    config, processes = run.config, run.processes
    result.epochs_done, result.final = epoch + 1, EvaluationResult.from_dict(record)
    diverged = config.on_nan == "stop" and record["train_nonfinite_steps"] > 0
    if processes.is_main:
        log.append(record)
        result.history.append(record)
        result.checkpoint = save_epoch(run, epoch, record, keep_older=diverged)
        best_path = run.out / BEST_NAME
        result.best_checkpoint = best_path if best_path.exists() else None
        run.report(_epoch_line(record, config.epochs))
    else:
        checkpoint_state(run, epoch + 1, 0, record)  # joins the gather
    processes.barrier()
    if diverged:
        result.interrupted = NONFINITE_STOP
        status_line(f"the loss became NaN at epoch {epoch + 1} step {record['train_first_nonfinite_step']}; last "
                    f"good checkpoint: {last_good or 'none (the first epoch diverged)'}", processes.is_main)
        return True
    if (stop or processes.any(signals.received is not None)) and epoch + 1 < config.epochs:
        result.interrupted = signals.received or "stop request"
        status_line(f"{result.interrupted}: stopped after epoch {epoch + 1} ({result.checkpoint}); "
                    f"continue with {option('resume', True)}", processes.is_main)
        return True
    return False


def _start_line(run: Run) -> str:
    config, info = run.config, run.info
    return (f"divco {__version__}: {config.model} x{config.branches} on {info['dataset']}; {run.device}, "
            f"{run.layout.describe()}, {run.steps_per_epoch} steps/epoch, lr "
            f"{info['base_lr']:.4g}, wd {info['weight_decay']:.3g}, {info['precision']}; recipe "
            f"{info['resolved']['recipe']}: {run.method.schedule_summary(run.plan)}, "
            f"{run.method.cotrain_summary(run.plan)}")


def _result_so_far(run: Run, log: Optional[RunLog], epochs_done: int) -> TrainResult:
    """The result of the epochs already done (of a resumed run: its records, last metrics and best.pt)."""
    result = TrainResult(out=run.out, epochs_done=epochs_done, history=list(log.records) if log else [],
                         final=None, info=run.info)
    if log is not None and log.last is not None and "test_ensembles" in log.last:
        result.final = EvaluationResult.from_dict(log.last)
    best_path = run.out / BEST_NAME
    result.best_checkpoint = best_path if best_path.exists() else None
    return result



def _epoch_line(record: dict, epochs: int) -> str:
    branches = " ".join(f"{100 * a:.2f}" for a in record["test_branch_acc"])
    validation = f"val acc {100 * record['val_ensemble_acc']:.2f} %  " if "val_ensemble_acc" in record else ""
    return (f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}  {validation}test acc ensemble "
            f"{100 * record['test_ensemble_acc']:.2f} %  branches [{branches}]  NLL {record['test_nll']:.4f}  "
            f"{record['images_per_s']:.1f} img/s")
