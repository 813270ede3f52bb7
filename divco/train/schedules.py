"""Learning-rate and co-training-weight schedules of a training run, per iteration / per epoch.

Every lr schedule is a :class:`StepSchedule`: ``lr(step)`` of the 0-based iteration over the
whole run, written into every parameter group by ``step()``; its state is the counter, so a
resumed run continues exactly. The training methods (divco.train.methods) pick theirs.
"""

from __future__ import annotations

import math

from ..ensembles.snapshot import SnapshotSchedule

COT_WEIGHT_FLOOR = 0.005


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


class SnapshotLR(StepSchedule):
    """The learning rate of a snapshot run: ``lr0 * SnapshotSchedule.factor(t)`` at iteration t
    (the step counter and its state are :class:`StepSchedule`'s)."""

    def __init__(self, optimizer, *, base_lr: float, total_steps: int, cycles: int) -> None:
        super().__init__(optimizer)
        self.base_lr = base_lr
        self.cycles = SnapshotSchedule(total_steps, cycles)
        self._apply(self.lr(0))

    def lr(self, step: int) -> float:
        """The rate of 0-based iteration ``step`` (iteration t = step + 1; held after the last)."""
        return self.cycles.lr(min(step + 1, self.cycles.total_iterations), self.base_lr)


class CyclicLR(StepSchedule):
    """The rate of a schedule object with ``lr(step)`` (divco.ensembles.cyclic: FGE's, SWA's); the step
    counter and its state are :class:`StepSchedule`'s."""

    def __init__(self, optimizer, rates) -> None:
        super().__init__(optimizer)
        self.rates = rates
        self._apply(self.lr(0))

    def lr(self, step: int) -> float:
        return self.rates.lr(step)
