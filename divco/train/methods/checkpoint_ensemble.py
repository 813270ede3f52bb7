"""What the checkpoint-ensemble methods (snapshot, cbnn) share: ONE network, M member checkpoints.

Not a method itself: snapshot and cbnn derive from :class:`CheckpointEnsembleMethod`, which
checks their options, keeps the members (divco.train.member_record.CheckpointEnsemble), writes a
member when the method says one is due, resumes them, and adds the member plan to
``--print-config``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..member_record import CheckpointEnsemble
from .base import TrainingMethod


def positive_number(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Refuse a method option that is given but not a finite number > 0 (>= 0 with ``allow_zero``)."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


class CheckpointEnsembleMethod(TrainingMethod):
    options = frozenset({"checkpoints"})
    single_process = "its members and sample weights are not sharded yet"
    checkpoint_ensemble = True
    branch_parallel_refusal = "it trains one network (branches = 1) whose checkpoints make the ensemble"

    def __init__(self) -> None:
        self.members: Optional[CheckpointEnsemble] = None

    def validate(self, config: Any) -> None:
        if config.checkpoints is not None and (not isinstance(config.checkpoints, int)
                                               or isinstance(config.checkpoints, bool) or config.checkpoints < 1):
            raise ValueError(f"checkpoints must be an int >= 1, got {config.checkpoints!r}")
        if config.members > config.epochs:
            raise ValueError(f"checkpoints must be <= epochs ({config.epochs}): each member needs at least one "
                             f"epoch of its own; got {config.members}")
        if config.branches != 1:
            raise ValueError(f"method {self.name!r} trains one network and stacks its {config.members} member "
                             f"checkpoints into the ensemble: branches must be 1, got {config.branches}")

    def start(self, run) -> None:
        self.members = CheckpointEnsemble(self.name, run.config.members)

    def take_member(self, run, epochs_done: int, steps: int, iteration: int, *, weighting: Optional[dict] = None,
                    errors=None, record: Optional[dict] = None, model_state: Optional[dict] = None) -> None:
        """Write the next member checkpoint (single process: these methods refuse distributed runs);
        ``model_state``: the member's weights when they are not the trained network's (swa's average)."""
        state = run.checkpoint_state(epochs_done, steps, record)
        if model_state is not None:
            state["model"] = model_state
        path = self.members.take(run.out, state, run.write_checkpoint, epochs_done=epochs_done, steps=steps,
                                 iteration=iteration, weighting=weighting, errors=errors)
        run.report(f"member {len(self.members.taken)}/{self.members.count}: {path.name} (iteration {iteration})")

    def take_member_after_step(self, run, epoch: int, step: int, iteration: int, **entry) -> None:
        """A member after optimiser step ``step`` of ``epoch``: an epoch's end, or a mid-epoch point."""
        ends_epoch = step + 1 == run.steps_per_epoch
        self.take_member(run, epoch + 1 if ends_epoch else epoch, 0 if ends_epoch else step + 1, iteration, **entry)

    def member_plan(self, plan) -> dict:
        """The ``checkpoint_ensemble`` entry of ``--print-config``; subclasses add when and how weighted."""
        return {"method": self.name, "members": plan.config.members,
                "ensemble": "weighted mean of the members' probabilities (mean_probs)"}

    def describe(self, plan, printed: dict) -> None:
        printed["checkpoint_ensemble"] = self.member_plan(plan)

    # -- state ------------------------------------------------------------------------------------
    def extra_state(self) -> Optional[dict]:
        """The method's own state beside the members (cbnn: its boosting state)."""
        return None

    def load_extra_state(self, state: Optional[dict]) -> None:
        pass

    def state_dict(self, run) -> dict:
        return {**self.members.state_dict(), "boosting": self.extra_state()}

    def load_state_dict(self, run, state: Optional[dict]) -> None:
        self.members.load_state_dict(state)
        self.load_extra_state(state["boosting"])
        if run.processes.is_main:  # members taken after this checkpoint are taken again, identically
            self.members.write_record(run.out)
