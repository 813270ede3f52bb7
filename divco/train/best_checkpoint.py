"""best.pt: the epoch with the best validation ensemble accuracy (the test set's without a validation split),
chosen as the run goes and recreated on resume when it was deleted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

from ..io import atomic_link_or_copy
from .checkpoint import BEST_NAME, checkpoint_name, entry_kind
from .run_log import read_metrics, warning


def selection_metric(record: dict) -> str:
    """The record field best.pt is chosen on: the validation ensemble accuracy, the test set's without
    a validation split."""
    return "val_ensemble_acc" if "val_ensemble_acc" in record else "test_ensemble_acc"


def improved_best(best: Optional[dict], record: dict) -> Optional[dict]:
    """The new ``best`` entry when the epoch of ``record`` beats ``best`` (None: it does not).

    An epoch with a non-finite loss never becomes best.
    """
    if not (math.isfinite(record["train_loss"]) and record.get("train_nonfinite_steps", 0) == 0):
        return None
    key = selection_metric(record)
    if best is not None and key in best and not record[key] > best[key]:
        return None
    return {"epoch": record["epoch"], "selected_on": key, key: record[key]}


def restore_best(folder: Union[str, Path], best: Optional[dict], epochs_done: int) -> Optional[dict]:
    """On resume: recreate a missing best.pt (it belongs to the run) and return the ``best`` entry to go on with.

    From the checkpoint of its epoch when it is still kept; else from the best epoch (metrics.jsonl)
    whose checkpoint is kept, with a warning; else None (the next epoch becomes best), with a warning.
    A best.pt that is not a file (a directory) is the user's: a ValueError, never removed.
    """
    folder = Path(folder)
    path = folder / BEST_NAME
    if path.is_file() or best is None:
        return best
    if path.exists() or path.is_symlink():
        raise ValueError(f"cannot resume {folder}: {path} is {entry_kind(path)}, where the run keeps its best "
                         f"checkpoint; move it away and resume again")
    kept = {}
    for record in read_metrics(folder, warn=False):
        epoch = record.get("epoch")
        source = folder / checkpoint_name(epoch, 0) if isinstance(epoch, int) else None
        if source is not None and epoch <= epochs_done and source.is_file():
            kept[epoch] = record
    if best["epoch"] in kept or (folder / checkpoint_name(best["epoch"], 0)).is_file():
        atomic_link_or_copy(folder / checkpoint_name(best["epoch"], 0), path)
        warning(f"{path} was missing: recreated from {checkpoint_name(best['epoch'], 0)} (epoch {best['epoch']})")
        return best
    candidates = [c for c in (improved_best(None, r) for r in kept.values()) if c is not None]
    if not candidates:
        warning(f"{path} was missing and no checkpoint of a finished epoch is kept: the best epoch from here on "
                f"becomes {BEST_NAME}")
        return None
    key = candidates[0]["selected_on"]
    chosen = max(candidates, key=lambda c: (c[key], -c["epoch"]))
    atomic_link_or_copy(folder / checkpoint_name(chosen["epoch"], 0), path)
    warning(f"{path} was missing and the checkpoint of its epoch {best['epoch']} is pruned: recreated from the "
            f"best kept epoch, {chosen['epoch']} ({key} {chosen[key]:.4f})")
    return chosen
