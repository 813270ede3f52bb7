"""Loading the native extension divco._C, safely.

A compiled extension only loads beside the torch it was built against: with another torch it
fails inside the dynamic loader (``libc10_cuda.so: cannot open shared object file``,
``undefined symbol ...``) or, worse, loads and crashes later. setup.py therefore records the
build's torch version, CUDA version and flags in ``divco/_C_build.json`` beside the module,
and :func:`load_extension` compares that record with the running torch *before* importing
``divco._C``. On a mismatch (or a loader failure) divco warns once, says how to rebuild, and
runs without the extension (the torch and Triton backends compute the same values);
asking for the "cpu" / "cuda" backends explicitly then raises a ValueError with that reason.
An extension that loads but was built from older sources (an operator missing or with another
schema, found by divco.ops.backends and divco.ops.registration) gets the same treatment through
:func:`warn_unusable`: one policy for every stale build.

This is the one place that imports divco._C: the ops' backend discovery calls
:func:`load_extension`.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

#: Written by setup.py beside the compiled module; read before importing it.
BUILD_RECORD = Path(__file__).with_name("_C_build.json")
EXTENSION = "divco._C"
REBUILD_HINT = (
    "rebuild it against this torch: pip install --no-build-isolation -e . in the divco source folder "
    "(in a development checkout: python setup.py build_ext --inplace)"
)

_loaded: Optional[tuple[Optional[ModuleType], str]] = None  # (module or None, why not), found once


def read_build_record(path: Optional[Path] = None) -> Optional[dict]:
    """The build record setup.py wrote (torch_version, torch_cuda_version, flags...), or None
    where there is none (a build older than the record, or a CMake build)."""
    path = BUILD_RECORD if path is None else path
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return {"unreadable": f"{path} is unreadable ({error})"}
    return record if isinstance(record, dict) else {"unreadable": f"{path} does not hold a JSON object"}


def build_mismatch(record: Optional[dict], torch_version: str, torch_cuda_version: Optional[str]) -> str:
    """Why an extension described by ``record`` must not be loaded beside this torch ("" if it may)."""
    if record is None:
        return ""
    if "unreadable" in record:
        return f"divco._C has no usable build record: {record['unreadable']}; {REBUILD_HINT}"
    built_torch, built_cuda = record.get("torch_version"), record.get("torch_cuda_version")
    if built_torch != torch_version or built_cuda != torch_cuda_version:
        return (
            f"divco._C was built against torch {built_torch} (CUDA {built_cuda or 'none'}) but torch "
            f"{torch_version} (CUDA {torch_cuda_version or 'none'}) is installed; {REBUILD_HINT}"
        )
    return ""


def _import_failure(error: BaseException) -> tuple[str, bool]:
    """(reason, whether to warn): a module that is simply absent is no surprise."""
    if isinstance(error, ModuleNotFoundError) and error.name == EXTENSION:
        return f"the native extension divco._C is not built ({error})", False
    return (
        f"divco._C failed to load ({type(error).__name__}: {error}); it may have been built against "
        f"another torch: {REBUILD_HINT}",
        True,
    )


def warn_unusable(reason: str) -> None:
    """The warning of every unusable build (another torch, a loader failure, older sources):
    the reason with the rebuild command, and what divco does instead."""
    warnings.warn(
        f"{reason}. divco runs without it: the 'cpu' and 'cuda' backends are unavailable (the default "
        "becomes the torch or Triton backend; asking for them is a ValueError).",
        RuntimeWarning,
        stacklevel=3,
    )


def stale_build_reason(what: str) -> str:
    """Why an extension that loaded cannot serve divco (built from older sources), with the rebuild."""
    return f"divco._C is out of date: {what} (built from older sources); {REBUILD_HINT}"


def load_extension() -> tuple[Optional[ModuleType], str]:
    """(divco._C, "") when it loads beside this torch, else (None, the reason). Found once.

    Warns (RuntimeWarning) when an extension exists but cannot be used; a missing extension
    (``DIVCO_NO_NATIVE=1`` installs) is silent: the reason is still returned.
    """
    global _loaded
    if _loaded is None:
        reason = build_mismatch(read_build_record(), torch.__version__, torch.version.cuda)
        module, warn = None, bool(reason)
        if not reason:
            try:
                module = importlib.import_module(EXTENSION)
            except (ImportError, OSError) as error:
                reason, warn = _import_failure(error)
        if warn:
            warn_unusable(reason)
        _loaded = (module, reason)
    return _loaded


def build_info() -> dict:
    """What this divco runs with: its version, the running torch, and the native extension's build
    (``divco._C.build_info()``: the torch it was built against, its CPU/CUDA kernels and archs) or why
    it is not loaded. Works in a fresh interpreter: torch is imported first, then the extension
    through :func:`load_extension` (importing ``divco._C`` alone fails with ``libc10.so`` not found)."""
    from . import __version__

    extension, reason = load_extension()
    native = {"loaded": extension is not None}
    if extension is not None:
        native.update(extension.build_info())
    else:
        native["reason"] = reason
    return {"divco_version": __version__, "torch_version": torch.__version__,
            "torch_cuda_version": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "native": native}
