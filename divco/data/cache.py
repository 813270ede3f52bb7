"""The decoded-data cache: uint8 tensors in safetensors files, written atomically.

Decoding 60,000 JPEGs or unpickling the CIFAR batches takes seconds; reading the
decoded tensors back takes milliseconds.  Cache files live in

    $DIVCO_CACHE_DIR/data/            if DIVCO_CACHE_DIR is set, else
    $XDG_CACHE_HOME/divco/data/       if XDG_CACHE_HOME is set, else
    ~/.cache/divco/data/

or in the folder given as ``cache_dir=`` (``--cache-dir`` on the command line);
``cache_dir=False`` (``--no-cache``) turns caching off.  A cache file is named by a
fingerprint of its source (path, sizes, modification times, options), so a changed
source is decoded again.  Each file stores a hash of its tensors and metadata and its
own key: a damaged, edited or misplaced cache file is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ..io import atomic_write_bytes

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


#: Metadata keys the cache adds to every file: a hash of the content and the file's key.
HASH_KEY = "content_blake2b"
KEY_KEY = "cache_key"


def content_hash(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """A hash of every tensor (name, dtype, shape, bytes) and every metadata entry."""
    digest = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    entries = sorted((k, v) for k, v in metadata.items() if k != HASH_KEY)
    digest.update(json.dumps(entries).encode())
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a cache file atomically, with its content hash and key (its name) in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {**metadata, KEY_KEY: Path(path).stem}
    metadata[HASH_KEY] = content_hash(tensors, metadata)
    atomic_write_bytes(path, save(tensors, metadata=metadata))


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
    # Images of another size, shuffled labels, edited statistics or a file copied under another
    # key (other decode parameters) all change the hash: decode again rather than use them.
    if metadata.get(KEY_KEY) != path.stem or metadata.get(HASH_KEY) != content_hash(tensors, metadata):
        warnings.warn(f"ignoring data cache {path}: its content does not match its hash or its key (modified, "
                      f"or written by an older divco); decoding the source again", stacklevel=2)
        return None
    return tensors, metadata
