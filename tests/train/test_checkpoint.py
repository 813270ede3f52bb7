"""Checkpoint files: atomic writes, safe loading, clear errors, retention."""

from __future__ import annotations

import os

import pytest
import torch
from train_helpers import checkpoint_state

from divco.train import list_checkpoints, load_checkpoint, save_checkpoint
from divco.train.checkpoint import CHECKPOINT_FORMAT, checkpoint_name, load_latest, prune_checkpoints


def state(value: float) -> dict:
    valid = checkpoint_state(value)
    return valid | {"weights": next(iter(valid["model"].values())), "python_state": (3, tuple(range(5)), None),
                    "big_int": 2**100 + 7}


def test_round_trip_and_atomic_replacement(tmp_path, monkeypatch):
    path = tmp_path / checkpoint_name(1, 0)
    save_checkpoint(path, state(1.0))
    loaded = load_checkpoint(path)
    assert (loaded["weights"] == 1).all() and loaded["big_int"] == 2**100 + 7
    assert loaded["python_state"] == (3, (0, 1, 2, 3, 4), None)

    # a crash while writing leaves the previous file intact and no temporary files behind
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, state(2.0))
    monkeypatch.undo()
    assert (load_checkpoint(path)["weights"] == 1).all()
    assert os.listdir(tmp_path) == [path.name]


def test_loading_never_runs_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "payload": Payload()}, path)
    with pytest.raises(ValueError, match=r"evil\.pt is truncated or corrupt.*GLOBAL posix\.system"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_foreign_and_missing_files(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, state(1.0))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"c\.pt is truncated or corrupt"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a divco training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    future = state(1.0) | {"version": 99}
    save_checkpoint(tmp_path / "future.pt", future)
    with pytest.raises(ValueError, match="upgrade divco"):
        load_checkpoint(tmp_path / "future.pt")


def test_ordering_latest_and_pruning(tmp_path):
    for epochs, steps in [(2, 0), (1, 0), (10, 0), (2, 5)]:
        save_checkpoint(tmp_path / checkpoint_name(epochs, steps), state(epochs + steps / 10))
    (tmp_path / "best.pt").write_bytes(b"x")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [checkpoint_name(1, 0), checkpoint_name(2, 0), checkpoint_name(2, 5), checkpoint_name(10, 0)]
    path, loaded = load_latest(tmp_path)
    assert path.name == checkpoint_name(10, 0) and (loaded["weights"] == 10).all()
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == names[:2]
    assert [p.name for p in list_checkpoints(tmp_path)] == names[2:] and (tmp_path / "best.pt").exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        load_latest(tmp_path / "empty")
