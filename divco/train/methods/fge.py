"""fge: Fast Geometric Ensembling (Garipov et al., NeurIPS 2018).

ONE network (``--branches 1``): the recipe's warm-up + cosine schedule over the pre-training
epochs (``--fge-start``), then triangular cycles of ``--fge-cycle`` epochs between ``--fge-lr1``
and ``--fge-lr2`` (divco.ensembles.cyclic.FgeSchedule); a member checkpoint after the middle
iteration of each cycle, where the rate reaches lr2 (mid-epoch when the middle falls there). The
M members are weighted equally. By default the pre-training phase lasts until the last member
falls on the run's last iteration, so the whole budget is used.
"""

from __future__ import annotations

from typing import Any

from ...ensembles.cyclic import FgeSchedule
from ..runtime import option
from ..schedules import CyclicLR
from .checkpoint_ensemble import CheckpointEnsembleMethod, positive_number

DEFAULT_CYCLE_EPOCHS = 2.0
#: lr1 and lr2 as fractions of the recipe's lr: Garipov et al.'s 0.05 and 0.0005 for a base lr of 0.1.
LR1_FRACTION, LR2_FRACTION = 0.5, 0.005


def fge_schedule(plan) -> FgeSchedule:
    """The FGE rates and member iterations of a run (a ValueError when they do not fit its budget)."""
    config, steps = plan.config, plan.steps_per_epoch
    cycle = round((config.fge_cycle or DEFAULT_CYCLE_EPOCHS) * steps)
    if cycle < 2:
        raise ValueError(f"an FGE cycle needs at least 2 iterations; {option('fge_cycle')} "
                         f"{config.fge_cycle or DEFAULT_CYCLE_EPOCHS:g} epoch(s) of {steps} step(s) is {cycle}")
    members = config.members
    if config.fge_start is None:
        pretrain = FgeSchedule.default_pretrain(plan.total_steps, cycle, members)
        if pretrain < 0:
            raise ValueError(f"{members} FGE cycles of {cycle} iterations need more than the run's "
                             f"{plan.total_steps}: lower {option('checkpoints')} or {option('fge_cycle')}")
    else:
        pretrain = round(config.fge_start * steps)
    lr = plan.recipe.lr
    return FgeSchedule(total=plan.total_steps, pretrain=pretrain, cycle=cycle, members=members,
                       lr1=config.fge_lr1 or LR1_FRACTION * lr, lr2=config.fge_lr2 or LR2_FRACTION * lr,
                       base_lr=lr, warmup=plan.warmup_steps, warmup_start_lr=plan.recipe.warmup_start_lr,
                       min_lr=plan.recipe.min_lr)


class Fge(CheckpointEnsembleMethod):
    name = "fge"
    summary = ("fge (Fast Geometric Ensembling: pre-training, then triangular lr cycles between --fge-lr1 and "
               "--fge-lr2, one member checkpoint at each cycle's minimum, equal weights; --branches 1)")
    options = frozenset({"checkpoints", "fge_start", "fge_cycle", "fge_lr1", "fge_lr2"})

    def __init__(self) -> None:
        super().__init__()
        self.member_iterations: frozenset[int] = frozenset()

    def validate(self, config: Any) -> None:
        super().validate(config)
        positive_number("fge_cycle", config.fge_cycle)
        positive_number("fge_lr1", config.fge_lr1)
        positive_number("fge_lr2", config.fge_lr2)
        positive_number("fge_start", config.fge_start, allow_zero=True)
        if config.fge_start is not None and config.fge_start >= config.epochs:
            raise ValueError(f"fge_start must be below the run's {config.epochs} epochs, got {config.fge_start!r}")
        if config.fge_lr1 is not None and config.fge_lr2 is not None and not config.fge_lr2 < config.fge_lr1:
            raise ValueError(f"fge_lr2 (the cycles' minimum) must be below fge_lr1, got {config.fge_lr2!r} >= "
                             f"{config.fge_lr1!r}")

    def schedule_summary(self, plan) -> str:
        rates = fge_schedule(plan)
        return (f"FGE: {rates.pretrain} pre-training iterations, then {rates.members} cycles of {rates.cycle} "
                f"between lr {rates.lr1:g} and {rates.lr2:g}")

    def lr_schedule(self, optimizer, plan):
        return CyclicLR(optimizer, fge_schedule(plan))

    def start(self, run) -> None:
        super().start(run)
        self.member_iterations = frozenset(fge_schedule(run.plan).member_iterations())

    def after_step(self, run, epoch: int, step: int, iteration: int) -> None:
        """A member when ``iteration`` is a cycle's middle (the end of an epoch, or mid-epoch)."""
        if iteration in self.member_iterations:
            self.take_member_after_step(run, epoch, step, iteration)

    def member_plan(self, plan) -> dict:
        return {**super().member_plan(plan), "member_iterations": fge_schedule(plan).member_iterations(),
                "weights": "equal"}

    def describe(self, plan, printed: dict) -> None:
        rates = fge_schedule(plan)
        printed["lr_schedule"] = {
            "type": "fge: the recipe's warm-up + cosine over the pre-training, then triangular cycles lr1 -> lr2 "
                    "-> lr1", "per": "iteration", "peak": rates.base_lr, "pretrain_steps": rates.pretrain,
            "warmup_steps": min(rates.warmup, max(rates.pretrain - 1, 0)), "cycle_steps": rates.cycle,
            "lr1": rates.lr1, "lr2": rates.lr2, "total_steps": rates.total}
        super().describe(plan, printed)
