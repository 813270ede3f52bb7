"""snapshot: Snapshot Ensembles (Huang et al. 2017).

ONE network (``--branches 1``); the learning rate follows M cosine cycles with restarts over
the run's iterations (divco.ensembles.SnapshotSchedule, no warm-up), a member checkpoint at the
end of each cycle (mid-epoch when a cycle ends there), the M members weighted equally.
"""

from __future__ import annotations

from ...ensembles.snapshot import SnapshotSchedule
from ..runtime import option
from ..schedules import SnapshotLR
from .checkpoint_ensemble import CheckpointEnsembleMethod


class Snapshot(CheckpointEnsembleMethod):
    name = "snapshot"
    summary = ("snapshot (Snapshot Ensembles: M cosine cycles with restarts, one member checkpoint per cycle, "
               "equal weights; --branches 1)")

    def __init__(self) -> None:
        super().__init__()
        self.cycles = None

    def schedule_summary(self, plan) -> str:
        return f"{plan.config.members} snapshot cycles (no lr warm-up)"

    def lr_schedule(self, optimizer, plan):
        """M cosine cycles with restarts instead of the recipe's schedule."""
        members, total = plan.config.members, plan.total_steps
        if members > total:
            raise ValueError(f"{members} snapshot cycles need at least {members} steps; this run has "
                             f"{total}: lower {option('checkpoints')} or {option('batch_size')}")
        return SnapshotLR(optimizer, base_lr=plan.recipe.lr, total_steps=total, cycles=members)

    def start(self, run) -> None:
        super().start(run)
        self.cycles = SnapshotSchedule(run.plan.total_steps, run.config.members)

    def after_step(self, run, epoch: int, step: int, iteration: int) -> None:
        """A member when ``iteration`` ends a cycle (the end of an epoch, or mid-epoch)."""
        if self.cycles.is_snapshot_iteration(iteration):
            self.take_member_after_step(run, epoch, step, iteration)

    def member_plan(self, plan) -> dict:
        cycles = SnapshotSchedule(max(plan.total_steps, plan.config.members), plan.config.members)
        return {**super().member_plan(plan), "member_iterations": cycles.snapshot_iterations(), "weights": "equal"}

    def describe(self, plan, printed: dict) -> None:
        cycles = SnapshotSchedule(max(plan.total_steps, plan.config.members), plan.config.members)
        printed["lr_schedule"] = {"type": "snapshot: cosine cycles with restarts, no warm-up", "per": "iteration",
                                  "peak": plan.recipe.lr, "cycles": plan.config.members,
                                  "cycle_steps": cycles.cycle_length, "total_steps": plan.total_steps}
        super().describe(plan, printed)
