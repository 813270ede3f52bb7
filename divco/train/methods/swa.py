"""swa: Stochastic Weight Averaging (Izmailov et al., UAI 2018), evaluated as ONE model.

ONE network (``--branches 1``): Izmailov et al.'s decay from the recipe's lr to ``--swa-lr``
over the first ``--swa-start`` epochs, then the constant ``--swa-lr`` (or, with
``--swa-lr-min``, a cyclic rate from --swa-lr down to it within each cycle;
divco.ensembles.cyclic.SwaSchedule). After the last iteration of every ``--swa-cycle`` epochs
from then on, the weights join a running average (``torch.optim.swa_utils.AveragedModel``).
Before the average is evaluated its BatchNorm statistics are recomputed
(``torch.optim.swa_utils.update_bn``) on the un-augmented training images, in the training
set's fixed order, at the training batch size: a pure function of the averaged weights, so a
resumed run recomputes the same statistics.

The epoch checkpoints hold the SGD weights as ``model`` (a resume continues them) and the
average with its count in ``checkpoint_ensemble``; from the first average on, every epoch's
metrics are the average's. At the end the average (statistics recomputed) is written as the
run's one member, member-01.pt, so ``divco eval RUN`` evaluates it as one model.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from ...ensembles.cyclic import SwaSchedule
from ..runtime import option
from ..schedules import CyclicLR
from ..step import unwrap_model
from .checkpoint_ensemble import CheckpointEnsembleMethod, positive_number

START_FRACTION = 0.75  # of the epochs: Izmailov et al. start averaging after about 3/4 of the budget
DEFAULT_CYCLE_EPOCHS = 1.0
SWA_LR_FRACTION = 0.5  # of the recipe's lr: Izmailov et al.'s 0.05 for a base lr of 0.1


def swa_schedule(plan) -> SwaSchedule:
    """The SWA rates and averaging iterations of a run (a ValueError when they do not fit its budget)."""
    config, steps = plan.config, plan.steps_per_epoch
    start_epochs = config.swa_start if config.swa_start is not None else round(START_FRACTION * config.epochs)
    cycle = round((config.swa_cycle or DEFAULT_CYCLE_EPOCHS) * steps)
    if cycle < 1:
        raise ValueError(f"{option('swa_cycle')} {config.swa_cycle:g} epoch(s) of {steps} step(s) is no iteration")
    return SwaSchedule(total=plan.total_steps, start=round(start_epochs * steps), cycle=cycle, base_lr=plan.recipe.lr,
                       swa_lr=config.swa_lr or SWA_LR_FRACTION * plan.recipe.lr, swa_lr_min=config.swa_lr_min)


class Swa(CheckpointEnsembleMethod):
    name = "swa"
    summary = ("swa (Stochastic Weight Averaging: after --swa-start epochs a constant or cyclic --swa-lr, the "
               "weights averaged every --swa-cycle epochs, BN statistics recomputed, evaluated as one model; "
               "--branches 1)")
    options = frozenset({"swa_start", "swa_lr", "swa_cycle", "swa_lr_min"})

    def __init__(self) -> None:
        super().__init__()
        self.average: Optional[AveragedModel] = None
        self.average_iterations: frozenset[int] = frozenset()
        self.statistics_stale = False  # the average moved since its BN statistics were recomputed

    @classmethod
    def member_count(cls, config: Any) -> int:
        return 1  # the average

    def validate(self, config: Any) -> None:
        super().validate(config)
        positive_number("swa_start", config.swa_start, allow_zero=True)
        positive_number("swa_cycle", config.swa_cycle)
        positive_number("swa_lr", config.swa_lr)
        positive_number("swa_lr_min", config.swa_lr_min)
        if config.swa_start is not None and config.swa_start >= config.epochs:
            raise ValueError(f"swa_start must be below the run's {config.epochs} epochs, got {config.swa_start!r}")

    def schedule_summary(self, plan) -> str:
        rates = swa_schedule(plan)
        kind = f"constant lr {rates.swa_lr:g}" if rates.swa_lr_min is None else \
            f"cyclic lr {rates.swa_lr:g} -> {rates.swa_lr_min:g}"
        return (f"SWA: {rates.start} iterations decaying to it, then {kind}, {len(rates.average_iterations())} "
                f"averages every {rates.cycle} iterations")

    def lr_schedule(self, optimizer, plan):
        return CyclicLR(optimizer, swa_schedule(plan))

    def start(self, run) -> None:
        super().start(run)
        self.average = AveragedModel(unwrap_model(run.net))
        self.average_iterations = frozenset(swa_schedule(run.plan).average_iterations())

    @property
    def averaged(self) -> int:
        return int(self.average.n_averaged) if self.average is not None else 0

    def after_step(self, run, epoch: int, step: int, iteration: int) -> None:
        if iteration in self.average_iterations:
            self.average.update_parameters(unwrap_model(run.net))
            self.statistics_stale = True

    def recompute_statistics(self, run) -> None:
        """update_bn over the un-augmented training images (fixed order, the training batch size)."""
        images = run.data.train_images
        memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
        batches = (run.augmenter.normalize(chunk.to(run.device)).contiguous(memory_format=memory_format)
                   for chunk in images.split(run.config.batch_size))
        with torch.no_grad():
            update_bn(batches, self.average, device=run.device)
        self.average.eval()
        self.statistics_stale = False

    def model_to_evaluate(self, run):
        if self.averaged == 0:  # before the averaging phase: the SGD weights
            return super().model_to_evaluate(run)
        if self.statistics_stale:
            self.recompute_statistics(run)
        return self.average.module

    def after_epoch(self, run, epoch: int, record: dict, train_images, train_labels) -> None:
        record["swa_averaged"] = self.averaged
        if epoch + 1 == run.config.epochs:  # the run's result: the average, its statistics recomputed
            model = self.model_to_evaluate(run)
            self.take_member(run, epoch + 1, 0, run.plan.total_steps, record=record,
                             model_state=model.state_dict(), weighting={"averaged": self.averaged})

    def member_plan(self, plan) -> dict:
        return {"method": self.name, "members": 1, "average_iterations": swa_schedule(plan).average_iterations(),
                "ensemble": "ONE model: the running average of the weights (torch.optim.swa_utils.AveragedModel), "
                            "BN statistics recomputed on the un-augmented training images (update_bn)"}

    def describe(self, plan, printed: dict) -> None:
        rates = swa_schedule(plan)
        printed["lr_schedule"] = {
            "type": "swa: lr0 for half the pre-averaging phase, linear to swa_lr at 90 % of it, then "
                    + ("constant swa_lr" if rates.swa_lr_min is None else "cycles from swa_lr to swa_lr_min"),
            "per": "iteration", "peak": rates.base_lr, "swa_start_steps": rates.start, "swa_lr": rates.swa_lr,
            "swa_lr_min": rates.swa_lr_min, "cycle_steps": rates.cycle, "total_steps": rates.total}
        super().describe(plan, printed)

    # -- state: the average and its count --------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"average": self.average.state_dict()}

    def load_extra_state(self, state: Optional[dict]) -> None:
        self.average.load_state_dict(state["average"])
        self.statistics_stale = self.averaged > 0  # recomputed from the weights: the same as before the stop
