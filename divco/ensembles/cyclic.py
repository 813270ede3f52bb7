"""The learning rates of Fast Geometric Ensembling (FGE) and Stochastic Weight Averaging (SWA).

Both papers run a normal schedule first (the pre-training phase), then a cyclic or constant
rate whose minima are the moments a model is kept (FGE: a member; SWA: a term of the average).
Everything here is a pure function of the 0-based iteration ``s`` (the rate that iteration
``s + 1`` trains with, as divco.train.schedules.StepSchedule counts), so a resumed run that
restores its counter continues exactly.

FGE (Garipov et al., NeurIPS 2018, section 4 and their ``utils.cyclic_learning_rate``): after
``pretrain`` iterations, with cycle length c iterations and t = mod(u, c) / c (u = s - pretrain),

    lr = (1 - 2t) lr1 + 2t lr2        t <= 1/2   (lr1 down to lr2)
    lr = (2 - 2t) lr2 + (2t - 1) lr1  t >  1/2   (back up to lr1)

and a member is taken after the c/2-th iteration of each cycle, where the rate reaches lr2.

SWA (Izmailov et al., UAI 2018, their ``train.py`` ``schedule``): before ``start`` iterations,
with t = s / start, the rate is lr0 for t <= 0.5, falls linearly to swa_lr at t = 0.9 and stays
there; from ``start`` on either the constant swa_lr, or (cyclic) within each cycle of c
iterations, with t(i) = (mod(i - 1, c) + 1) / c for the i-th iteration since ``start``,

    lr = (1 - t(i)) swa_lr + t(i) swa_lr_min

The running average takes the weights after the last iteration of every cycle (for the
constant rate, every ``cycle`` iterations: one epoch in divco's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _positive_rate(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite learning rate > 0, got {value!r}")


def cosine_pretraining_lr(step: int, *, base_lr: float, total: int, warmup: int, warmup_start_lr: float,
                          min_lr: float) -> float:
    """divco's recipe schedule over ``total`` iterations (linear warm-up, cosine decay to ``min_lr``)."""
    if warmup > 0 and step <= warmup:
        return min(warmup_start_lr + step / warmup * (base_lr - warmup_start_lr), base_lr)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return max(0.5 * base_lr * (1.0 + math.cos(math.pi * progress)), min_lr)


@dataclass(frozen=True)
class FgeSchedule:
    """FGE's rate after ``pretrain`` iterations of the recipe's schedule; ``members`` minima taken."""

    total: int  # iterations of the whole run
    pretrain: int  # iterations of the pre-training phase (the recipe's warm-up + cosine over them)
    cycle: int  # c, iterations per cycle (>= 2)
    members: int
    lr1: float  # the cycles' maximum (their start)
    lr2: float  # the cycles' minimum (where a member is taken)
    base_lr: float  # the pre-training phase's peak
    warmup: int = 0
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _positive_int("total", self.total)
        _positive_int("pretrain", self.pretrain, minimum=0)
        _positive_int("cycle", self.cycle, minimum=2)
        _positive_int("members", self.members)
        for name in ("lr1", "lr2", "base_lr"):
            _positive_rate(name, getattr(self, name))
        if not self.lr2 < self.lr1:
            raise ValueError(f"the cycles' minimum lr2 must be below their maximum lr1, got lr1={self.lr1!r} "
                             f"lr2={self.lr2!r}")
        last = self.member_iterations()[-1]
        if last > self.total:
            raise ValueError(f"{self.members} FGE members after {self.pretrain} pre-training iterations with cycles "
                             f"of {self.cycle} need {last} iterations; the run has {self.total}")

    @property
    def half(self) -> int:
        return self.cycle // 2

    def member_iterations(self) -> list[int]:
        """The 1-based iterations after which a member is taken (each cycle's lr2)."""
        return [self.pretrain + self.half + j * self.cycle for j in range(self.members)]

    def lr(self, step: int) -> float:
        if step < self.pretrain:
            return cosine_pretraining_lr(step, base_lr=self.base_lr, total=self.pretrain,
                                         warmup=min(self.warmup, self.pretrain - 1),
                                         warmup_start_lr=min(self.warmup_start_lr, self.base_lr),
                                         min_lr=min(self.min_lr, self.base_lr))
        t = ((step - self.pretrain) % self.cycle) / self.cycle
        if t <= 0.5:
            return (1.0 - 2.0 * t) * self.lr1 + 2.0 * t * self.lr2
        return (2.0 - 2.0 * t) * self.lr2 + (2.0 * t - 1.0) * self.lr1

    @classmethod
    def default_pretrain(cls, total: int, cycle: int, members: int) -> int:
        """The pre-training length that puts the last member on the run's last iteration."""
        return total - (members - 1) * cycle - cycle // 2


@dataclass(frozen=True)
class SwaSchedule:
    """SWA's rate: Izmailov et al.'s decay to ``swa_lr`` before ``start``, then constant or cyclic."""

    total: int
    start: int  # iterations before the first averaging cycle
    cycle: int  # iterations per averaging cycle
    base_lr: float
    swa_lr: float
    swa_lr_min: Optional[float] = None  # None: the constant swa_lr; else the cyclic rate's minimum

    def __post_init__(self) -> None:
        _positive_int("total", self.total)
        _positive_int("start", self.start, minimum=0)
        _positive_int("cycle", self.cycle)
        _positive_rate("base_lr", self.base_lr)
        _positive_rate("swa_lr", self.swa_lr)
        if self.swa_lr_min is not None:
            _positive_rate("swa_lr_min", self.swa_lr_min)
            if not self.swa_lr_min < self.swa_lr:
                raise ValueError(f"the cyclic SWA rate's minimum must be below swa_lr, got swa_lr={self.swa_lr!r} "
                                 f"swa_lr_min={self.swa_lr_min!r}")
        if not self.average_iterations():
            raise ValueError(f"SWA from iteration {self.start} with cycles of {self.cycle} iterations averages no "
                             f"model in a run of {self.total}: start earlier or shorten the cycle")

    def average_iterations(self) -> list[int]:
        """The 1-based iterations after which the weights join the average (each cycle's end)."""
        return list(range(self.start + self.cycle, self.total + 1, self.cycle))

    def lr(self, step: int) -> float:
        if step < self.start:
            t = step / self.start
            if t <= 0.5:
                return self.base_lr
            if t <= 0.9:
                return self.base_lr + (self.swa_lr - self.base_lr) * (t - 0.5) / 0.4
            return self.swa_lr
        if self.swa_lr_min is None:
            return self.swa_lr
        t = ((step - self.start) % self.cycle + 1) / self.cycle
        return (1.0 - t) * self.swa_lr + t * self.swa_lr_min


@dataclass(frozen=True)
class RestartSchedule:
    """The recipe's warm-up + cosine restarted in every interval ``(ends[k-1], ends[k]]`` of iterations
    (cbnn with ``--cbnn-schedule restarts``: every member ends an annealed interval; the warm-up only in
    the first)."""

    ends: tuple[int, ...]  # the last iteration (1-based) of each interval, increasing; the last is the run's
    base_lr: float
    warmup: int = 0
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if not self.ends or any(not isinstance(e, int) or isinstance(e, bool) for e in self.ends) or \
                any(b <= a for a, b in zip((0,) + tuple(self.ends), self.ends)):
            raise ValueError(f"ends must be increasing iterations >= 1, got {self.ends!r}")
        _positive_rate("base_lr", self.base_lr)

    def lr(self, step: int) -> float:
        begin = 0
        for end in self.ends:
            if step < end or end == self.ends[-1]:
                length = end - begin
                warmup = min(self.warmup, length - 1) if begin == 0 else 0
                return cosine_pretraining_lr(step - begin, base_lr=self.base_lr, total=length, warmup=warmup,
                                             warmup_start_lr=min(self.warmup_start_lr, self.base_lr),
                                             min_lr=min(self.min_lr, self.base_lr))
            begin = end
        raise AssertionError("unreachable")
