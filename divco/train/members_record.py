"""members.json checked against the member checkpoints it names (the checkpoints are the truth).

members.json is a readable summary rewritten after every member; the member checkpoints hold
what was trained (the run's config, and each member's own entry: epoch, step, iteration,
cbnn's alpha and error).  An edited or stale members.json - a method swapped, an alpha
changed, an entry missing a field - would change the ensemble's weights or end in a
KeyError; :func:`validate_members_record` refuses it with one line naming the file, the
member and the field.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..vocabulary import CHECKPOINT_ENSEMBLE_METHODS

#: The fields of a member entry that its checkpoint's ``member`` entry also holds (cbnn adds alpha, error).
_ENTRY_FIELDS = ("index", "file", "epochs_done", "steps_into_epoch", "iteration")
_BOOSTING_FIELDS = ("alpha", "error")


def validate_members_record(path: Path, record: dict, states: list[dict]) -> None:
    """Raise ValueError unless members.json ``record`` agrees with the member checkpoints ``states``."""
    from .checkpoint import checkpoint_config

    def fail(reason: str):
        raise ValueError(f"{path} does not match the member checkpoints it lists: {reason} (the checkpoints "
                         f"hold what was trained: restore members.json, e.g. from a backup)")

    method = record.get("method")
    if method not in CHECKPOINT_ENSEMBLE_METHODS:
        fail(f"'method' must be one of {CHECKPOINT_ENSEMBLE_METHODS}, got {method!r}")
    for position, (entry, state) in enumerate(zip(record["members"], states)):
        config = checkpoint_config(state)
        name = entry.get("file", f"member {position + 1}")
        if config.method != method:
            fail(f"it says method {method!r}, but {name} was trained with {config.method!r}")
        if record.get("checkpoints") != config.members:
            fail(f"it says 'checkpoints' {record.get('checkpoints')!r}, but {name} belongs to a run of "
                 f"{config.members} member checkpoints")
        truth = state["member"]
        for key in _ENTRY_FIELDS + (_BOOSTING_FIELDS if method == "cbnn" else ()):
            if key not in entry:
                fail(f"member {position + 1} has no {key!r} (its checkpoint: {truth.get(key)!r})")
            if not _same(entry[key], truth.get(key)):
                fail(f"member {position + 1} says {key} {entry[key]!r}, its checkpoint {name} {truth.get(key)!r}")


def checked_members_weights(path: Path, record: dict, states: list[dict]) -> list[float]:
    """The ensemble weights of members.json ``record`` once it agrees with its checkpoints ``states``
    (:func:`validate_members_record`); the ``weight`` it shows per member must be the one used (or null)."""
    from .members import ensemble_weights

    validate_members_record(path, record, states)
    weights = ensemble_weights(record["method"], record["members"])
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
