"""Per-epoch records: metrics.jsonl (one JSON object per epoch) and TensorBoard when installed."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

from ..io import append_line, atomic_write_text

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"


def warning(message: str) -> None:
    """A warning about the run folder on stderr, always (``progress=False`` hides status lines, not these)."""
    line = f"divco: warning: {message}"
    try:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)  # does not break a progress bar
    except ImportError:
        print(line, file=sys.stderr, flush=True)


def read_metrics(folder, *, warn: bool = True) -> list[dict]:
    """The records of metrics.jsonl.  A last line cut short (a process killed mid-append: no newline,
    not JSON) is dropped with a warning; any other line that is not JSON is an error."""
    path = Path(folder) / METRICS_NAME
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                if warn:
                    warning(f"{path} line {number} was cut short by an interrupted write (not JSON: "
                            f"{line[:40]!r}): dropped")
                break
            raise ValueError(f"{path} line {number} is not JSON ({error})") from None
    return records


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


class RunLog:
    """Appends epoch records durably; on resume keeps only the epochs the checkpoint covers."""

    def __init__(self, folder: Path, *, tensorboard: bool, epochs_done: int = 0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / METRICS_NAME
        kept = [r for r in read_metrics(self.folder) if r.get("epoch", 0) <= epochs_done]
        if self.path.exists() or kept:
            # Epochs after the checkpoint are recomputed: drop their records (atomically).
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        self.writer = self._tensorboard(purge_step=epochs_done + 1) if tensorboard else None

    def _tensorboard(self, purge_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: the tensorboard package is not installed
            return None
        try:
            return SummaryWriter(log_dir=str(self.folder / "tensorboard"), purge_step=purge_step)
        except Exception as error:  # never let the optional logger stop training
            warnings.warn(f"TensorBoard logging disabled: {error}", stacklevel=2)
            return None

    def append(self, record: dict) -> None:
        append_line(self.path, json.dumps(record))
        self.records.append(record)
        if self.writer is not None:
            step = record["epoch"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self.writer.add_scalar(key, value, step)
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/{i}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @property
    def last(self) -> Optional[dict]:
        return self.records[-1] if self.records else None
