"""The record of a checkpoint ensemble's members as a run takes them: members.json and its weights.

The writing side of divco.train.members (which reads a finished run back): the training
methods that take member checkpoints (divco.train.methods.snapshot, .cbnn) keep a
:class:`CheckpointEnsemble`; it needs no checkpoint code of its own (the engine's writer is
passed in), so the methods, and the configuration that lists them, stay below the checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from torch import Tensor

from ..io import atomic_write_text

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

    def take(self, out: Path, state: dict, save: Callable[[Path, dict], Path], *, epochs_done: int, steps: int,
             iteration: int, weighting: Optional[dict] = None, errors: Optional[Tensor] = None) -> Path:
        """Write member ``len(taken)`` (the checkpoint ``state`` plus its entry, with ``save(path, state)``:
        the checkpoint writer), then members.json.

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
        path = save(out / member_name(index), member_state)
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
    """The members' weights: the last member's ``validation_weights`` where it carries them (cbnn fitted
    on held-out data), else their alphas normalised to sum 1 where they carry one (cbnn), else equal
    (snapshot, fge; swa's one member).

    Members whose every alpha so far is 0 (none better than chance) have no ensemble
    weights: a ValueError, never invented weights.
    """
    if not entries:
        return []
    if "validation_weights" in entries[-1]:  # cbnn's weights fitted on held-out data, over every member so far
        weights = [float(w) for w in entries[-1]["validation_weights"]]
        if len(weights) != len(entries):
            raise ValueError(f"the last member's validation_weights name {len(weights)} member(s), the record has "
                             f"{len(entries)}")
        return weights
    if "alpha" in entries[0]:
        alphas = [float(e["alpha"]) for e in entries]
        total = sum(alphas)
        if not total > 0:
            raise ValueError(f"every cbnn member so far has alpha 0 (a weighted training error no better than "
                             f"chance): the ensemble has no weights (alphas {alphas})")
        return [a / total for a in alphas]
    return [1.0 / len(entries)] * len(entries)
