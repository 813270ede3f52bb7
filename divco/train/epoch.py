"""One epoch of a run: its steps (stoppable at any step) and its record (metrics, evaluation, timing)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Optional

from torch import Tensor

from .evaluation import evaluate, evaluate_validation
from .runtime import SignalStop, progress_bar, to_model_layout

if TYPE_CHECKING:
    from .assembly import Run

#: ``should_stop(epoch, steps_done_in_epoch) -> bool``, asked after every step.
StopRequest = Callable[[int, int], bool]


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
                                         **options)  # best.pt is chosen on it (best_checkpoint.improved_best)
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
