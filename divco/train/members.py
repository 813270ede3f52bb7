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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..models.base import BranchBatchedNetwork
from ..stacking import stack
from . import methods
from .checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint
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
    weights = checked_members_weights(path, record, states)  # members.json against its checkpoints
    return RunMembers(folder, record, states, weights)


# -- members.json against the member checkpoints it names (the checkpoints hold what was trained) ------

#: The fields of a member entry that its checkpoint's ``member`` entry also holds (cbnn adds alpha, error).
_ENTRY_FIELDS = ("index", "file", "epochs_done", "steps_into_epoch", "iteration")
_BOOSTING_FIELDS = ("alpha", "error")
#: Fields some members carry (cbnn's held-out weights, swa's count of averaged models).
_OPTIONAL_FIELDS = ("validation_weights", "averaged")


def validate_members_record(path: Path, record: dict, states: list[dict]) -> None:
    """Raise ValueError unless members.json ``record`` agrees with the member checkpoints ``states``."""
    def fail(reason: str):
        raise ValueError(f"{path} does not match the member checkpoints it lists: {reason} (the checkpoints "
                         f"hold what was trained: restore members.json, e.g. from a backup)")

    takers = tuple(name for name in methods.METHODS if methods.method_class(name).checkpoint_ensemble)
    method = record.get("method")
    if method not in takers:
        fail(f"'method' must be one of {takers}, got {method!r}")
    for position, (entry, state) in enumerate(zip(record["members"], states)):
        config = checkpoint_config(state)
        name = entry.get("file", f"member {position + 1}")
        if config.method != method:
            fail(f"it says method {method!r}, but {name} was trained with {config.method!r}")
        if record.get("checkpoints") != config.members:
            fail(f"it says 'checkpoints' {record.get('checkpoints')!r}, but {name} belongs to a run of "
                 f"{config.members} member checkpoints")
        truth = state["member"]
        checked = _ENTRY_FIELDS + (_BOOSTING_FIELDS if "alpha" in truth else ()) + \
            tuple(key for key in _OPTIONAL_FIELDS if key in truth)
        for key in checked:
            if key not in entry:
                fail(f"member {position + 1} has no {key!r} (its checkpoint: {truth.get(key)!r})")
            if not _same(entry[key], truth.get(key)):
                fail(f"member {position + 1} says {key} {entry[key]!r}, its checkpoint {name} {truth.get(key)!r}")


def checked_members_weights(path: Path, record: dict, states: list[dict]) -> list[float]:
    """The ensemble weights of members.json ``record`` once it agrees with its checkpoints ``states``
    (:func:`validate_members_record`); the ``weight`` it shows per member must be the one used (or null)."""
    validate_members_record(path, record, states)
    weights = ensemble_weights(record["members"])
    for position, (entry, weight) in enumerate(zip(record["members"], weights)):
        shown = entry.get("weight")
        if shown is not None and not _same(shown, weight):
            raise ValueError(f"{path} does not match the member checkpoints it lists: member {position + 1} says "
                             f"weight {shown!r}, its checkpoints give {weight!r} (restore members.json)")
    return weights


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
