"""Snapshot Ensembles (Huang et al., ICLR 2017): M cosine cycles with restarts, one snapshot per cycle.

Over T iterations (t = 1..T) split into M cycles of ceil(T/M) iterations each,

    lr(t) = lr0 / 2 * (cos(pi * mod(t - 1, ceil(T/M)) / ceil(T/M)) + 1)

so every cycle starts at lr0 (a restart) and anneals towards 0; a snapshot is taken at the end
of each cycle and the M snapshots are averaged with equal weights. The learning rate is a pure
function of the iteration counter: a resumed run that restores the counter continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


class CyclePosition(NamedTuple):
    cycle: int  # 0-based index of the cycle iteration t belongs to
    step_in_cycle: int  # 0-based position of t inside its cycle: mod(t - 1, ceil(T/M))


@dataclass(frozen=True)
class SnapshotSchedule:
    """The cyclic cosine schedule of ``cycles`` = M cycles over ``total_iterations`` = T iterations.

    An instance is also the ``lr_lambda`` of ``torch.optim.lr_scheduler.LambdaLR`` (see
    :meth:`scheduler`): LambdaLR's step count s = 0, 1, ... is iteration t = s + 1.
    """

    total_iterations: int
    cycles: int

    def __post_init__(self) -> None:
        for name in ("total_iterations", "cycles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (self.cycles - 1) * self.cycle_length >= self.total_iterations:
            raise ValueError(f"{self.cycles} cycles of ceil({self.total_iterations}/{self.cycles}) = "
                             f"{self.cycle_length} iterations leave the last cycle empty; use fewer cycles or "
                             f"more iterations")

    @property
    def cycle_length(self) -> int:
        """ceil(T / M): iterations per cycle (the last one may be shorter)."""
        return -(-self.total_iterations // self.cycles)

    def _check_iteration(self, t: int) -> None:
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= self.total_iterations:
            raise ValueError(f"iteration must be an int in [1, {self.total_iterations}], got {t!r}")

    def position(self, t: int) -> CyclePosition:
        """Where iteration t (1-based) lies: its cycle and its step inside the cycle."""
        self._check_iteration(t)
        return CyclePosition(*divmod(t - 1, self.cycle_length))

    def factor(self, t: int) -> float:
        """lr(t) / lr0 for iteration t (1-based), in (0, 1]."""
        step = self.position(t).step_in_cycle
        return 0.5 * (math.cos(math.pi * step / self.cycle_length) + 1.0)

    def lr(self, t: int, base_lr: float) -> float:
        """lr(t) for the base learning rate lr0 = ``base_lr``."""
        return base_lr * self.factor(t)

    def snapshot_iterations(self) -> list[int]:
        """The iterations (1-based) after which a snapshot is taken: the last of each cycle."""
        return [min((c + 1) * self.cycle_length, self.total_iterations) for c in range(self.cycles)]

    def is_snapshot_iteration(self, t: int) -> bool:
        self._check_iteration(t)
        return t == self.total_iterations or t % self.cycle_length == 0

    def __call__(self, step: int) -> float:
        # LambdaLR calls this with its step count s (0 at construction) and sets lr = lr0 * factor(s + 1).
        # It keeps stepping past T at the end of a run (a final scheduler.step()): hold the last value.
        return self.factor(min(step + 1, self.total_iterations))

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR for ``optimizer`` (lr0 = each group's initial lr); call ``.step()`` after every
        iteration. Its state_dict (step count) is all a resume needs."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self)
