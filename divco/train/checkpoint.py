"""Checkpoints that never lose work: atomic writes, safe loads, a bounded history.

A checkpoint is written to a temporary file beside its destination, fsynced, renamed
over the destination and the folder fsynced: a crash leaves the previous checkpoint
or the new one, never a torn file (see :mod:`divco.io`).  Loading uses
``torch.load(weights_only=True)``: only tensors and plain Python values are rebuilt,
no pickled code runs.  :func:`load_checkpoint` then checks the structure once
(:func:`divco.train.checkpoint_validation.validate_checkpoint`), for eval, export and resume alike: a checkpoint that is
not what divco writes gets one ValueError "not a divco checkpoint: ...", before any
model is allocated.

Run folder layout::

    DIR/checkpoint-e0003-s000000.pt   end of epoch 3 (3 epochs done)
    DIR/checkpoint-e0003-s000017.pt   interrupted in epoch 4 after 17 of its steps
    DIR/best.pt                       the epoch with the best validation ensemble accuracy (the test
                                      set's when the run has no validation split, val_split=0)
    DIR/metrics.jsonl, DIR/config.json

best.pt is chosen and recreated by divco.train.best_checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from ..io import atomic_torch_save
from .run_lock import LOCK_NAME
from .checkpoint_validation import checkpoint_config, validate_checkpoint
from .run_log import CONFIG_NAME, warning

if TYPE_CHECKING:
    from ..models.base import BranchBatchedNetwork
    from .config import TrainConfig

CHECKPOINT_FORMAT = "divco-train-checkpoint"
CHECKPOINT_VERSION = 1
BEST_NAME = "best.pt"
_PATTERN = re.compile(r"^checkpoint-e(\d{4,})-s(\d{6,})\.pt$")


def checkpoint_name(epochs_done: int, steps_into_epoch: int) -> str:
    return f"checkpoint-e{epochs_done:04d}-s{steps_into_epoch:06d}.pt"


def save_checkpoint(path: Union[str, Path], state: dict) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    return atomic_torch_save(path, state)


def load_checkpoint(path: Union[str, Path]) -> dict:
    """Read a training checkpoint safely and check its structure (:func:`validate_checkpoint`)."""
    state = read_checkpoint_file(path)
    validate_checkpoint(state, path)
    return state


def read_checkpoint_file(path: Union[str, Path]) -> dict:
    """Read a checkpoint file safely; a missing, truncated or foreign file gets a ValueError naming it."""
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


def checkpoint_of(path: Union[str, Path]) -> Path:
    """``path`` itself for a file; for a run folder its best.pt, else (with a warning saying why and
    what is used instead) its newest checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return path
    best = path / BEST_NAME
    if best.is_file():
        return best
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is a folder without checkpoints (expected {BEST_NAME} or "
                                f"checkpoint-e*-s*.pt files of a divco training run)")
    problem = f"{best} is {entry_kind(best)}, not a checkpoint" if best.exists() else f"{path} has no {BEST_NAME}"
    warning(f"{problem}: using the newest checkpoint {found[-1].name} instead")
    return found[-1]


def entry_kind(path: Path) -> str:
    """What is at ``path`` where a checkpoint file was expected."""
    return "a directory" if path.is_dir() else "not a regular file"


# -- resuming ------------------------------------------------------------------------------------


def nothing_to_resume(folder: Union[str, Path]) -> ValueError:
    """The error of a resume in a folder without checkpoints: what the folder holds instead (one line)."""
    from .runtime import option

    folder = Path(folder)
    contents = [p for p in folder.iterdir() if p.name != LOCK_NAME] if folder.is_dir() else []
    config = folder / CONFIG_NAME
    if not contents:
        holds = "the folder is empty"
    elif config.is_file():
        holds = f"its {CONFIG_NAME} {_config_problem(config) or 'is of a run stopped before its first checkpoint'}"
    else:
        holds = f"it holds no {CONFIG_NAME} either ({len(contents)} other entr{'y' if len(contents) == 1 else 'ies'})"
    return ValueError(f"cannot resume {folder}: it holds no checkpoint (checkpoint-e*-s*.pt) and {holds}; run "
                      f"without {option('resume', True)} to start a new run there")


def _config_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a run's config.json (None: it is one)."""
    from .config import TrainConfig

    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"is not valid JSON ({error})"
    if not isinstance(values, dict):
        return f"is not a JSON object (a {type(values).__name__})"
    values.pop("resolved", None)
    try:
        TrainConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        return f"is not a divco run configuration ({error})"
    return None


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


def model_from_checkpoint(checkpoint: Union[str, Path, dict]) -> BranchBatchedNetwork:
    """The trained branch-batched model of a training checkpoint (on the CPU, eval mode)."""
    if isinstance(checkpoint, dict):
        validate_checkpoint(checkpoint)
        state = checkpoint
    else:
        state = load_checkpoint(checkpoint)
    from .. import models  # the model layer, loaded when a model is rebuilt

    info = state["model_info"]
    model = models.create(info["name"], num_classes=info["num_classes"], branches=info["branches"],
                          **info.get("model_kwargs", {}))
    model.load_state_dict(state["model"])
    return model.eval()


def find_resume_point(config: "TrainConfig", device: torch.device, *, verbose: bool) -> Optional[tuple[Path, dict]]:
    """The checkpoint to resume, or None for a new run; refuses to overwrite a run (and a resume whose
    options differ from the checkpoint's)."""
    from .runtime import option

    out = Path(config.out)
    existing = list_checkpoints(out)
    if not config.resume:
        if existing or (out / "metrics.jsonl").exists():
            raise ValueError(f"{out} already holds a training run; pass {option('resume', True)} to "
                             f"continue it, or choose another {option('out')}")
        return None
    if not existing:
        raise nothing_to_resume(out)
    path, state = load_latest(out)
    differences = checkpoint_config(state).run_defining_differences(config)
    written_on = state.get("device_type", device.type)  # the device's type changes the numbers
    if written_on != device.type:
        differences.append(f"a {device.type} device (this run: {written_on})")
    if differences:
        raise ValueError(f"cannot resume {path}: it was trained with different options; this command gives "
                         + "; ".join(differences) + f". Use the run's original options, or choose another "
                         f"{option('out')}")
    return path, state
