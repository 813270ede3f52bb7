"""Writes that never lose a user's work: the one atomic-write helper of the package.

Every file divco writes (checkpoints, metrics, configs, exported branches, the data
cache) goes through :func:`atomic_write_path`: the content is written to a temporary
file beside the destination, fsynced, given the usual permissions (umask) and renamed
over the destination, and the folder is fsynced.  A crash leaves the previous file or
the new one, never a torn file; a failure (disk full, file-size limit, read-only
folder) removes the temporary file and raises :class:`WriteError`, whose message is
one line naming the file and the OS error.

Temporary files are named ``.<name>.<random>.tmp``; one left behind by a killed
process is removed by :func:`remove_temporaries` (the training engine calls it at
the start of a run, under the run's lock).

This module imports nothing from divco and no torch at import time: any layer may use it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]

#: Temporary files of :func:`atomic_write_path`: ``.<destination name>.<random>.tmp``.
TEMPORARY_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


class WriteError(OSError):
    """A file could not be written; ``str()`` is one line naming the file and the OS error."""


def _write_error(path: Path, error: OSError) -> WriteError:
    reason = error.strerror or str(error)
    failure = WriteError(f"cannot write {path.name} in the folder {path.parent}: {reason}")
    failure.errno = error.errno
    return failure


@contextlib.contextmanager
def atomic_write_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    Readers see either the old file or the complete new one; on failure the temporary
    file is removed, ``path`` is untouched and an OSError becomes a :class:`WriteError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        # After the body: writers that replace the file (not just write into it) keep the mode.
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except WriteError:
        _remove_quietly(tmp)
        raise
    except OSError as error:
        _remove_quietly(tmp)
        raise _write_error(path, error) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write_path`)."""
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(path: PathLike, obj: object) -> Path:
    """``torch.save(obj)`` to ``path`` atomically.

    The object is serialised in memory first: torch's zip writer reports a failed
    write as an opaque RuntimeError ("unexpected pos ..."), a plain file write as the
    OS error (disk full, file too large, read-only folder).
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def atomic_link_or_copy(source: PathLike, destination: PathLike) -> Path:
    """Make ``destination`` the same file as ``source``, atomically (a hard link where possible)."""
    with atomic_write_path(destination) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            import shutil

            shutil.copyfile(source, tmp)
    return Path(destination)


def append_line(path: PathLike, line: str) -> None:
    """Append one line durably (flush and fsync); an OSError becomes a :class:`WriteError`."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(line if line.endswith("\n") else line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise _write_error(path, error) from None


def remove_temporaries(folder: PathLike) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in ``folder``; return them.

    Only call it while no other process writes into ``folder`` (e.g. under a lock):
    a live writer's temporary file looks the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if TEMPORARY_PATTERN.match(path.name) and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: PathLike) -> None:
    """Make a rename durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path) -> None:
    if path is not None:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass
