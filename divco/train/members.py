"""Checkpoint ensembles (``--method snapshot|cbnn``): the M member checkpoints of one run.

A snapshot or cbnn run trains ONE network (``branches=1``) and keeps M of its states as the
members of an ensemble. Run folder additions::

    DIR/member-01.pt ... member-MM.pt   the members: full training checkpoints (atomic writes,
                                         safe loads, divco eval/export read them) with a
                                         ``member`` entry; named outside the checkpoint-e*-s*.pt
                                         pattern, so --keep-checkpoints never prunes them
    DIR/members.json                    the method, every member taken so far (file, epoch, step,
                                         alpha, error) and the ensemble weights, rewritten
                                         atomically after each member

    snapshot  Huang et al. 2017: the learning rate follows M cosine cycles with restarts over the
              run's iterations (divco.ensembles.SnapshotSchedule, no warm-up), a member at the end of
              each cycle (mid-epoch when a cycle ends there), equal weights.
    cbnn      divco's reading of Wang et al. 2021 (SAMME applied to checkpoints, the rule in
              divco.ensembles.boosting.samme_update): the normal schedule; after the epochs of
              checkpoint_epochs(E, M) the model in eval mode predicts the un-augmented training set,
              BoostingState.record gives the member's alpha and the new sample weights, and the loss
              weighs each image by its sample weight from then on (mean 1 over the training set).
              The ensemble weights are the alphas normalised to sum 1.

Everything a resumed run needs (sample weights, alphas, members taken, the schedule's counter)
is in every progress checkpoint (``checkpoint_ensemble``), so a resumed run takes the same members
with the same weights as an uninterrupted one.

For evaluation and export the members are stacked (:func:`divco.stack`) into one M-branch model:
the ensemble's inference is one launch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ..ensembles.boosting import BoostingState, checkpoint_errors, resolve_damping
from ..ensembles.snapshot import SnapshotSchedule
from ..io import atomic_write_text
from ..models.base import BranchBatchedNetwork
from ..stacking import stack
from .checkpoint import load_checkpoint, save_checkpoint
from .recipe import StepSchedule

MEMBERS_NAME = "members.json"
MEMBERS_FORMAT = "divco-checkpoint-ensemble"


def member_name(index: int) -> str:
    """The file of member ``index`` (0-based): member-01.pt, member-02.pt, ..."""
    return f"member-{index + 1:02d}.pt"


class SnapshotLR(StepSchedule):
    """The learning rate of a snapshot run: ``lr0 * SnapshotSchedule.factor(t)`` at iteration t
    (the step counter and its state are :class:`divco.train.recipe.StepSchedule`'s)."""

    def __init__(self, optimizer, *, base_lr: float, total_steps: int, cycles: int) -> None:
        super().__init__(optimizer)
        self.base_lr = base_lr
        self.cycles = SnapshotSchedule(total_steps, cycles)
        self._apply(self.lr(0))

    def lr(self, step: int) -> float:
        """The rate of 0-based iteration ``step`` (iteration t = step + 1; held after the last)."""
        return self.cycles.lr(min(step + 1, self.cycles.total_iterations), self.base_lr)


class CheckpointEnsemble:
    """The members of a snapshot/cbnn run as it trains: when to take one, the sample weights, resume.

    The engine calls :meth:`after_step` after every optimiser step and :meth:`after_epoch` after
    every epoch; either takes a member when one is due (``take`` writes it). :meth:`batch_weights`
    gives the loss weights of a batch (None for snapshot: unweighted).
    """

    def __init__(self, method: str, members: int, *, total_steps: int, epochs: int, num_samples: int,
                 num_classes: int, shrinkage: Optional[float], error_kind: Optional[str],
                 device: torch.device, weight_ratio: Optional[float] = None) -> None:
        self.method = method
        self.count = members
        self.total_steps = total_steps
        self.taken: list[dict] = []  # the members.json entries of the members taken so far
        self.boosting: Optional[BoostingState] = None
        self.snapshots: Optional[SnapshotSchedule] = None
        self._loss_weights: Optional[Tensor] = None
        self.device = device
        if method == "snapshot":
            self.snapshots = SnapshotSchedule(total_steps, members)
        else:
            shrinkage, max_weight_ratio = resolve_damping(shrinkage, weight_ratio)
            self.boosting = BoostingState(num_samples, num_classes, epochs, members, shrinkage=shrinkage,
                                          error_kind=error_kind or "zero_one", max_weight_ratio=max_weight_ratio)
            self._refresh_loss_weights()

    # -- when -------------------------------------------------------------------------------
    def snapshot_due(self, iteration: int) -> bool:
        """Snapshot: whether iteration ``iteration`` (1-based, over the run) ends a cycle."""
        return self.snapshots is not None and self.snapshots.is_snapshot_iteration(iteration)

    def boosting_due(self, epochs_done: int) -> bool:
        """CBNN: whether a member is due after ``epochs_done`` epochs."""
        return self.boosting is not None and self.boosting.is_checkpoint_epoch(epochs_done)

    # -- the sample weights -------------------------------------------------------------------
    def _refresh_loss_weights(self) -> None:
        self._loss_weights = self.boosting.loss_weights().to(device=self.device, dtype=torch.float32)

    def batch_weights(self, index: Tensor) -> Optional[Tensor]:
        """The loss weights [B] of the training images ``index`` (None: an unweighted loss)."""
        if self._loss_weights is None:
            return None
        return self._loss_weights.index_select(0, index)

    def boosting_round(self, train_logits: Tensor, train_labels: Tensor) -> dict:
        """CBNN's round at a member: errors of its training-set logits [N, 1, K] -> alpha, new weights."""
        errors = checkpoint_errors(train_logits, train_labels, self.boosting.error_kind).cpu()
        result = self.boosting.record(errors)
        self._refresh_loss_weights()
        return {"alpha": result.alpha, "error": result.error, "errors": errors}

    # -- members ------------------------------------------------------------------------------
    def weights(self) -> list[float]:
        """The ensemble weights of the members taken so far (sum 1)."""
        return ensemble_weights(self.method, self.taken)

    def take(self, out: Path, state: dict, *, epochs_done: int, steps: int, iteration: int,
             boosting: Optional[dict] = None) -> Path:
        """Write member ``len(taken)`` (the checkpoint ``state`` plus its entry), then members.json."""
        index = len(self.taken)
        entry = {"index": index, "file": member_name(index), "epochs_done": epochs_done, "steps_into_epoch": steps,
                 "iteration": iteration}
        if boosting is not None:
            entry.update(alpha=boosting["alpha"], error=boosting["error"])
        member_state = dict(state)
        member_state["member"] = {**entry, "errors": boosting["errors"] if boosting is not None else None}
        member_state["checkpoint_ensemble"] = None  # a member is not a resume point
        path = save_checkpoint(out / member_name(index), member_state)
        self.taken.append(entry)
        self.write_record(out)
        return path

    def record(self) -> dict:
        """members.json: a member's ``weight`` is null while no member has a positive alpha."""
        try:
            weights = self.weights()
        except ValueError:
            weights = [None] * len(self.taken)
        return {"format": MEMBERS_FORMAT, "method": self.method, "checkpoints": self.count,
                "members": [{**entry, "weight": w} for entry, w in zip(self.taken, weights)],
                "complete": len(self.taken) == self.count}

    def write_record(self, out: Path) -> None:
        atomic_write_text(out / MEMBERS_NAME, json.dumps(self.record(), indent=2, sort_keys=True) + "\n")

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"method": self.method, "members": [dict(e) for e in self.taken],
                "boosting": self.boosting.to_dict() if self.boosting is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("method") != self.method:
            raise ValueError(f"the checkpoint holds no {self.method} state (checkpoint_ensemble is "
                             f"{None if not isinstance(state, dict) else state.get('method')!r})")
        self.taken = [dict(e) for e in state["members"]]
        if self.boosting is not None:
            self.boosting = BoostingState.from_dict(state["boosting"])
            self._refresh_loss_weights()


def ensemble_weights(method: str, entries: list[dict]) -> list[float]:
    """Snapshot: equal weights; cbnn: the alphas normalised to sum 1.

    A cbnn run whose every member so far has alpha 0 (none better than chance) has no ensemble
    weights: a ValueError, never invented weights.
    """
    if not entries:
        return []
    if method == "cbnn":
        alphas = [float(e["alpha"]) for e in entries]
        total = sum(alphas)
        if not total > 0:
            raise ValueError(f"every cbnn member so far has alpha 0 (a weighted training error no better than "
                             f"chance): the ensemble has no weights (alphas {alphas})")
        return [a / total for a in alphas]
    return [1.0 / len(entries)] * len(entries)


# -- reading a finished (or interrupted) run -------------------------------------------------------------


@dataclass(frozen=True)
class RunMembers:
    """The members of a snapshot/cbnn run folder, read safely."""

    folder: Path
    record: dict  # members.json
    states: list[dict]  # the member checkpoints, in order
    weights: list[float]

    @property
    def method(self) -> str:
        return self.record["method"]

    def models(self) -> list[BranchBatchedNetwork]:
        from .export import model_from_checkpoint

        return [model_from_checkpoint(state) for state in self.states]

    def stacked(self) -> BranchBatchedNetwork:
        """The members as ONE M-branch model (branch j = member j), eval mode, on the CPU."""
        return stack(self.models()).eval()


def is_members_run(path: Union[str, Path]) -> bool:
    """Whether ``path`` is the folder of a snapshot/cbnn run (it holds members.json)."""
    path = Path(path)
    return path.is_dir() and (path / MEMBERS_NAME).is_file()


def load_members(folder: Union[str, Path]) -> RunMembers:
    """members.json and every member checkpoint it lists (a clear error for a missing or foreign one)."""
    folder = Path(folder)
    path = folder / MEMBERS_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} holds no {MEMBERS_NAME}: not the folder of a snapshot or cbnn run") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != MEMBERS_FORMAT or \
            not isinstance(record.get("members"), list):
        raise ValueError(f"{path} is not a divco members record (format {MEMBERS_FORMAT!r} with a members list)")
    if not record["members"]:
        raise ValueError(f"{path} lists no member yet: the run has not reached its first member checkpoint")
    states = []
    for position, entry in enumerate(record["members"]):
        if not isinstance(entry, dict) or entry.get("file") != member_name(position):
            raise ValueError(f"{path}: member {position} must be the file {member_name(position)}, got {entry!r}")
        state = load_checkpoint(folder / entry["file"])
        if not isinstance(state.get("member"), dict) or state["member"].get("index") != position:
            raise ValueError(f"{folder / entry['file']} is not member {position} of this run (its member entry: "
                             f"{state.get('member')!r})")
        states.append(state)
    weights = ensemble_weights(record["method"], record["members"])
    return RunMembers(folder, record, states, weights)
