"""One process per run folder: an exclusive lock on DIR/train.lock.

Two ``divco train`` on one ``--out`` (or a ``--resume`` while the run is alive) would
write every epoch twice.  The training process holds an ``fcntl.flock`` on the lock
file for its whole life; the kernel drops it when the process ends however it ends
(also SIGKILL), so a lock file left by a dead process is taken over (with a message
naming that process).  The file records the holder's pid and host for the message a
second process gets.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable, Optional

LOCK_NAME = "train.lock"


class RunFolderBusy(ValueError):
    """Another live process trains in this run folder."""


class RunLock:
    """``with RunLock(folder):`` - exclusive, non-blocking; raises RunFolderBusy when taken."""

    def __init__(self, folder, *, announce: Optional[Callable[[str], None]] = None) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.announce = announce
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise RunFolderBusy(f"{self.path.parent} is in use by another training process ({holder}); wait for it "
                                f"to finish or stop it, or choose another output folder") from None
        previous = self._holder_record()
        if previous and self.announce is not None:
            self.announce(f"taking over the stale lock of process {previous.get('pid')} on "
                          f"{previous.get('host')}, which no longer runs ({self.path})")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        # Empty the record first: a file without a holder is a cleanly released lock.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _holder_record(self) -> Optional[dict]:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def _holder(self) -> str:
        record = self._holder_record()
        return f"pid {record.get('pid')} on {record.get('host')}" if record else "pid unknown"

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
