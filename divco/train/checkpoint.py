"""Checkpoints that never lose work: atomic writes, safe loads, a bounded history.

A checkpoint is written to a temporary file beside its destination, fsynced, renamed
over the destination and the folder fsynced: a crash leaves the previous checkpoint
or the new one, never a torn file (see :mod:`divco.io`).  Loading uses
``torch.load(weights_only=True)``: only tensors and plain Python values are rebuilt,
no pickled code runs.  :func:`load_checkpoint` then checks the structure once
(:func:`validate_checkpoint`), for eval, export and resume alike: a checkpoint that is
not what divco writes gets one ValueError "not a divco checkpoint: ...", before any
model is allocated.

Run folder layout::

    DIR/checkpoint-e0003-s000000.pt   end of epoch 3 (3 epochs done)
    DIR/checkpoint-e0003-s000017.pt   interrupted in epoch 4 after 17 of its steps
    DIR/best.pt                       the epoch with the best validation ensemble accuracy (the test
                                      set's when the run has no validation split, val_split=0)
    DIR/metrics.jsonl, DIR/config.json
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ..io import atomic_link_or_copy, atomic_torch_save
from .run_lock import LOCK_NAME
from .run_log import CONFIG_NAME, read_metrics, warning

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
    problem = f"{best} is {_kind(best)}, not a checkpoint" if best.exists() else f"{path} has no {BEST_NAME}"
    warning(f"{problem}: using the newest checkpoint {found[-1].name} instead")
    return found[-1]


def _kind(path: Path) -> str:
    return "a directory" if path.is_dir() else "not a regular file"


# -- the run's best checkpoint ----------------------------------------------------------------


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
        raise ValueError(f"cannot resume {folder}: {path} is {_kind(path)}, where the run keeps its best "
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


# -- resuming ------------------------------------------------------------------------------------


def checkpoint_config(state: dict):
    """The TrainConfig of a checkpoint; one written before the validation split had none (val_split 0)."""
    from .config import TrainConfig

    return TrainConfig.from_dict({"val_split": 0, **state["config"]})


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


# -- structure ---------------------------------------------------------------------------------


def validate_checkpoint(state: dict, source: Union[str, Path] = "the checkpoint") -> None:
    """Check everything eval, export and resume read from a checkpoint, before anything is built.

    Raises ValueError "<source> is not a divco checkpoint: <what is wrong>".  The model's
    weights are compared with ``model_info`` on the meta device (no memory allocated).
    """

    def fail(reason: str):
        raise ValueError(f"{source} is not a divco checkpoint: {reason}")

    def require(container: dict, key: str, kinds, where: str) -> Any:
        if key not in container:
            fail(f"{where}{key!r} is missing")
        value = container[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
            names = "/".join(k.__name__ for k in _as_tuple(kinds))
            fail(f"{where}{key!r} must be {names}, got {type(value).__name__}")
        return value

    def count(container: dict, key: str, where: str = "", minimum: int = 0) -> int:
        value = require(container, key, int, where)
        if value < minimum:
            fail(f"{where}{key!r} must be >= {minimum}, got {value}")
        return value

    for key in ("config", "model_info", "dataset", "model", "optimizer", "schedule"):
        require(state, key, dict, "")
    require(state, "local_states", list, "")
    if not all(isinstance(local, dict) for local in state["local_states"]):
        fail("'local_states' must be a list of dicts")
    info, dataset, weights = state["model_info"], state["dataset"], state["model"]
    name = require(info, "name", str, "model_info ")
    branches = count(info, "branches", "model_info ", minimum=1)
    num_classes = count(info, "num_classes", "model_info ", minimum=1)
    model_kwargs = require(info, "model_kwargs", dict, "model_info ")
    if not all(isinstance(k, str) for k in model_kwargs):
        fail("model_info 'model_kwargs' must have str keys")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        fail("'model' must map parameter names to tensors")
    parameters = sum(v.numel() for v in weights.values())
    if branches * num_classes > parameters:  # every branch has at least one classifier weight per class
        fail(f"model_info says {branches} branch(es) x {num_classes} classes but the weights hold only "
             f"{parameters} values")
    epochs_done = count(state, "epochs_done")
    count(state, "steps_into_epoch")
    count(state, "world_size", minimum=1)
    for key in ("mean", "std"):
        values = require(dataset, key, list, "dataset ")
        if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            fail(f"dataset {key!r} must be 3 finite numbers, got {values!r}")
    if min(dataset["std"]) <= 0:
        fail(f"dataset 'std' must be > 0, got {dataset['std']!r}")
    classes = require(dataset, "classes", list, "dataset ")
    if len(classes) != num_classes:
        fail(f"dataset has {len(classes)} classes but model_info says {num_classes}")

    try:
        config = checkpoint_config(state)
    except (TypeError, ValueError) as error:
        fail(f"its config is invalid ({error})")
    if (config.model, config.branches, config.model_kwargs) != (name, branches, model_kwargs):
        fail(f"its config ({config.model} x{config.branches}, {config.model_kwargs}) and model_info "
             f"({name} x{branches}, {model_kwargs}) disagree")
    if epochs_done > config.epochs:
        fail(f"'epochs_done' is {epochs_done} but the run has only {config.epochs} epoch(s)")
    _check_weights_match(weights, name, num_classes, branches, model_kwargs, fail)


def _check_weights_match(weights: dict, name: str, num_classes: int, branches: int, model_kwargs: dict,
                         fail) -> None:
    """The weights have exactly the names and shapes of the model model_info describes."""
    from .. import models

    try:
        with torch.device("meta"):
            expected = models.create(name, num_classes=num_classes, branches=branches, **model_kwargs).state_dict()
    except (TypeError, ValueError) as error:
        fail(f"model_info does not describe a model divco can build ({error})")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        fail(f"its weights do not match model_info {name} x{branches}: missing {missing[:3]}, "
             f"unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            fail(f"its weights do not match model_info {name} x{branches}: {key} has shape "
                 f"{tuple(weights[key].shape)}, expected {tuple(tensor.shape)}")


def _as_tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


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
