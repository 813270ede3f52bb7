"""Checkpoints that never lose work: atomic writes, safe loads, a bounded history.

A checkpoint is written to a temporary file beside its destination, fsynced, renamed
over the destination and the folder fsynced: a crash leaves the previous checkpoint
or the new one, never a torn file.  Loading uses ``torch.load(weights_only=True)``:
only tensors and plain Python values are rebuilt, no pickled code runs.

Run folder layout::

    DIR/checkpoint-e0003-s000000.pt   end of epoch 3 (3 epochs done)
    DIR/checkpoint-e0003-s000017.pt   interrupted in epoch 4 after 17 of its steps
    DIR/best.pt                       the epoch with the best test ensemble accuracy
    DIR/metrics.jsonl, DIR/config.json
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch

from ..data.cache import atomic_write_path

CHECKPOINT_FORMAT = "divco-train-checkpoint"
CHECKPOINT_VERSION = 1
BEST_NAME = "best.pt"
_PATTERN = re.compile(r"^checkpoint-e(\d{4,})-s(\d{6,})\.pt$")


def checkpoint_name(epochs_done: int, steps_into_epoch: int) -> str:
    return f"checkpoint-e{epochs_done:04d}-s{steps_into_epoch:06d}.pt"


def save_checkpoint(path: Union[str, Path], state: dict) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
    return path


def load_checkpoint(path: Union[str, Path]) -> dict:
    """Read a checkpoint safely; a missing, truncated or foreign file gets a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be loaded ({_reason(error)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a divco training checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {state.get('version')}; this divco reads up to "
                         f"{CHECKPOINT_VERSION}: upgrade divco")
    return state


def _reason(error: Exception) -> str:
    """The informative line of a torch.load error (the others are generic advice)."""
    generic = ("Weights only load failed", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(generic)]
    reason = (specific or lines or [""])[0]
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def list_checkpoints(folder: Union[str, Path]) -> list[Path]:
    """Progress checkpoints in ``folder``, oldest first (by epochs and steps done)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _PATTERN.match(path.name)
        if match and path.is_file():
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Union[str, Path]) -> Optional[Path]:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_latest(folder: Union[str, Path]) -> tuple[Path, dict]:
    """The newest checkpoint of a run folder.  If it is damaged, say so and name the previous one."""
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume in {folder} (expected checkpoint-e*-s*.pt files)")
    newest = found[-1]
    try:
        return newest, load_checkpoint(newest)
    except ValueError as error:
        previous = f"; the previous checkpoint {found[-2]} is intact: remove {newest.name} to resume from it" \
            if len(found) > 1 else ""
        raise ValueError(f"{error}{previous}") from None


def prune_checkpoints(folder: Union[str, Path], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` progress checkpoints (best.pt is separate); return the deleted."""
    found = list_checkpoints(folder)
    doomed = found[:-keep] if keep > 0 else found
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
