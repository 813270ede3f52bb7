"""The run folder of a training: created if needed, locked for one process, cleaned of interrupted writes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..io import WriteError, remove_temporaries
from .run_lock import LOCK_NAME, RunLock
from .run_log import warning


class locked_run_folder:  # noqa: N801 - used as a context manager, like open()
    """Create ``out`` if needed, hold its lock, remove leftover temporaries; on failure remove what it created."""

    def __init__(self, out: Path, *, verbose: bool) -> None:
        self.out, self.verbose = out, verbose
        self.created = not out.exists()
        self.lock: Optional[RunLock] = None

    def __enter__(self) -> Path:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.out, announce=warning).acquire()
        except WriteError:
            raise
        except OSError as error:
            raise WriteError(f"cannot write in the run folder {self.out}: {error.strerror or error}") from None
        for leftover in remove_temporaries(self.out):  # of a killed process (the lock says none runs)
            warning(f"removed {leftover.name}, left by an interrupted write")
        return self.out

    def __exit__(self, kind, error, traceback) -> None:
        self.lock.release()
        # a failed start leaves no new empty run folder
        if kind is not None and self.created and all(p.name == LOCK_NAME for p in self.out.iterdir()):
            shutil.rmtree(self.out, ignore_errors=True)
