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
from typing import Union

from ..models.base import BranchBatchedNetwork
from ..stacking import stack
from .checkpoint import load_checkpoint, model_from_checkpoint
from .member_record import MEMBERS_FORMAT, MEMBERS_NAME, ensemble_weights, member_name

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
