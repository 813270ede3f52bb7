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

When a member is taken, with which weight and how the samples are weighted is the method's
(divco.train.methods.snapshot and .cbnn); this module keeps the members and reads them back.

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

from torch import Tensor

from ..io import atomic_write_text
from ..models.base import BranchBatchedNetwork
from ..stacking import stack
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

MEMBERS_NAME = "members.json"
MEMBERS_FORMAT = "divco-checkpoint-ensemble"

#: How a checkpoint ensemble combines its members: the weighted mean of their probabilities.
MEMBERS_ENSEMBLE_MODE = "mean_probs"


def member_name(index: int) -> str:
    """The file of member ``index`` (0-based): member-01.pt, member-02.pt, ..."""
    return f"member-{index + 1:02d}.pt"


class CheckpointEnsemble:
    """The members of a snapshot/cbnn run as it trains: the members taken, members.json, resume.

    When a member is due and with which weight is the run's method's (divco.train.methods):
    it calls :meth:`take` with the member's checkpoint and, for a weighted member, its
    ``alpha`` (and ``error``) and the per-sample ``errors`` that gave them.
    """

    def __init__(self, method: str, members: int) -> None:
        self.method = method
        self.count = members
        self.taken: list[dict] = []  # the members.json entries of the members taken so far

    def weights(self) -> list[float]:
        """The ensemble weights of the members taken so far (sum 1)."""
        return ensemble_weights(self.taken)

    def take(self, out: Path, state: dict, *, epochs_done: int, steps: int, iteration: int,
             weighting: Optional[dict] = None, errors: Optional[Tensor] = None) -> Path:
        """Write member ``len(taken)`` (the checkpoint ``state`` plus its entry), then members.json.

        ``weighting``: the member's ``alpha`` and ``error`` (None: an equally weighted member).
        """
        index = len(self.taken)
        entry = {"index": index, "file": member_name(index), "epochs_done": epochs_done, "steps_into_epoch": steps,
                 "iteration": iteration}
        if weighting is not None:
            entry.update(weighting)
        member_state = dict(state)
        member_state["member"] = {**entry, "errors": errors}
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
        return {"method": self.method, "members": [dict(e) for e in self.taken]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("method") != self.method:
            raise ValueError(f"the checkpoint holds no {self.method} state (checkpoint_ensemble is "
                             f"{None if not isinstance(state, dict) else state.get('method')!r})")
        self.taken = [dict(e) for e in state["members"]]


def ensemble_weights(entries: list[dict]) -> list[float]:
    """The members' weights: their alphas normalised to sum 1 where they carry one (cbnn),
    else equal (snapshot).

    Members whose every alpha so far is 0 (none better than chance) have no ensemble
    weights: a ValueError, never invented weights.
    """
    if not entries:
        return []
    if "alpha" in entries[0]:
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
    weights = ensemble_weights(record["members"])
    return RunMembers(folder, record, states, weights)
