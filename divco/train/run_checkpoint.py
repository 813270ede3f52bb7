"""The checkpoints of a run: the state of a moment, the end of an epoch, a mid-epoch stop, a resume.

A checkpoint holds every process's random streams, augmenter and partial metrics (gathered to
rank 0), so :func:`restore` continues a run - also one stopped in the middle of an epoch - to
the bit. The file format, its checks and loading are divco.train.checkpoint's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from .. import __version__
from ..io import atomic_link_or_copy
from .best_checkpoint import improved_best
from .checkpoint import (
    BEST_NAME,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_name,
    prune_checkpoints,
    save_checkpoint,
)
from .export import spec_json
from .runtime import global_rng_state, option, set_global_rng_state, status_line
from .step import unwrap_model

if TYPE_CHECKING:
    from .assembly import Run


def save_epoch(run: Run, epoch: int, record: dict, keep_older: bool = False) -> Path:
    """Checkpoint the end of ``epoch`` (rank 0), update best.pt, prune old checkpoints (unless keep_older)."""
    improved = improved_best(run.best, record)  # on the validation split (the test set without one)
    run.best = improved or run.best
    path = save_checkpoint(run.out / checkpoint_name(epoch + 1, 0), checkpoint_state(run, epoch + 1, 0, record))
    if improved:
        atomic_link_or_copy(path, run.out / BEST_NAME)
    if not keep_older:
        prune_checkpoints(run.out, run.config.keep_checkpoints)
    return path


def stop_mid_epoch(run: Run, reason: str, epoch: int, steps: int, last_record: Optional[dict]) -> Optional[Path]:
    """Checkpoint ``steps`` steps into ``epoch`` (every process calls it); the path on rank 0, else None."""
    state = checkpoint_state(run, epoch, steps, last_record)
    path = None
    if run.processes.is_main:
        path = save_checkpoint(run.out / checkpoint_name(epoch, steps), state)
        prune_checkpoints(run.out, run.config.keep_checkpoints)
        status_line(f"{reason}: saved {path} ({steps} step(s) into epoch {epoch + 1}); "
                    f"continue with {option('resume', True)}")
    run.processes.barrier()
    return path


def checkpoint_state(run: Run, epochs_done: int, steps: int, last_record: Optional[dict]) -> Optional[dict]:
    """The checkpoint of this moment on rank 0 (None elsewhere); every process must call it."""
    local_states = run.processes.gather_objects(_local_state(run))
    config, data, net = run.config, run.data, unwrap_model(run.net)
    model_state, optimizer_state = run.layout.full_state(net, run.optimizer)  # collective: the one-process state
    if not run.processes.is_main:
        return None
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "divco_version": __version__,
        "torch_version": str(torch.__version__), "config": config.to_dict(), "device_type": run.device.type,
        "epochs_done": epochs_done, "steps_into_epoch": steps,
        "model_info": {"name": config.model, "branches": config.branches, "num_classes": data.num_classes,
                       "model_kwargs": config.model_kwargs, "family": getattr(net, "family", ""),
                       "spec": spec_json(net)},
        "dataset": {"name": data.name, "source": data.source, "classes": list(data.classes),
                    "mean": list(data.mean), "std": list(data.std), "image_size": list(data.image_size)},
        "model": model_state, "optimizer": optimizer_state,
        "schedule": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "best": run.best, "world_size": run.processes.world_size,
        "branch_parallel": run.layout.branch_groups, "local_states": local_states,
        "last_record": last_record,
        "checkpoint_ensemble": run.method.state_dict(run),
    }


def _local_state(run: Run) -> dict:
    """What each process must restore to continue bit-exactly (gathered to rank 0)."""
    return {"augmenter": run.augmenter.state_dict(), "partial_metrics": run.step.metrics.state_dict(),
            **global_rng_state(run.device)}


def restore(run: Run, path: Path, state: dict) -> tuple[int, int]:
    """Load a checkpoint into the run; return (epochs done, steps done in the next epoch)."""
    epochs_done, steps_done = state["epochs_done"], state["steps_into_epoch"]
    if epochs_done > run.config.epochs or steps_done >= run.steps_per_epoch or \
            (epochs_done == run.config.epochs and steps_done):
        raise ValueError(f"{path} is not a divco checkpoint of this run: it says {epochs_done} epoch(s) and "
                         f"{steps_done} step(s) done, the run has {run.config.epochs} epoch(s) of "
                         f"{run.steps_per_epoch} step(s)")
    run.layout.load_state(unwrap_model(run.net), run.optimizer, state["model"], state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.best = state.get("best")
    run.method.load_state_dict(run, state.get("checkpoint_ensemble"))
    local_states = state["local_states"]
    local = run.layout.local_state(state)
    if local is not None:
        run.augmenter.load_state_dict(local["augmenter"])
        run.step.metrics.load_state_dict(local["partial_metrics"])
        set_global_rng_state(local, run.device)
    else:
        run.report(f"the checkpoint was written by {len(local_states)} process(es) "
                   f"(--branch-parallel {state.get('branch_parallel', 1)}), this run has {run.layout.data_parallel} "
                   f"data shard(s): random streams restart, so results will differ from an "
                   f"uninterrupted run")
    run.report(f"resuming {path} ({epochs_done} epoch(s) and {steps_done} step(s) done)")
    return epochs_done, steps_done
