"""The decoded-data cache: uint8 tensors in safetensors files, written atomically.

Decoding 60,000 JPEGs or unpickling the CIFAR batches takes seconds; reading the
decoded tensors back takes milliseconds.  Cache files live in

    $DIVCO_CACHE_DIR/data/            if DIVCO_CACHE_DIR is set, else
    $XDG_CACHE_HOME/divco/data/       if XDG_CACHE_HOME is set, else
    ~/.cache/divco/data/

or in the folder given as ``cache_dir=`` (``--cache-dir`` on the command line);
``cache_dir=False`` (``--no-cache``) turns caching off.  A cache file is named by a
fingerprint of its source (path, sizes, modification times, options), so a changed
source is decoded again; a damaged cache file is ignored and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union

from torch import Tensor

CacheDir = Union[str, os.PathLike, None, bool]


def default_cache_dir() -> Path:
    root = os.environ.get("DIVCO_CACHE_DIR")
    if root:
        return Path(root) / "data"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "divco" / "data"


def resolve_cache_dir(cache_dir: CacheDir) -> Optional[Path]:
    """``None``/``True``: the default folder; ``False``: no cache; else that folder."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir)


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (the cache key)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def tree_fingerprint(root: Path) -> list:
    """(relative path, size, mtime) of every file below ``root``: changes when the data does."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.stat()
            entries.append((str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return entries


def file_fingerprint(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


@contextlib.contextmanager
def atomic_write_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    Readers see either the old file or the complete new one, never a partial file;
    on failure the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: Path) -> None:
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


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_write_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> Optional[tuple[dict[str, Tensor], dict[str, str]]]:
    """The cached tensors and metadata, or None when absent or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # a damaged cache is derived data: decode the source again
        warnings.warn(f"ignoring unreadable data cache {path} ({error}); decoding the source again", stacklevel=2)
        return None
    return tensors, metadata
