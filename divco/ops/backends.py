"""Which implementation runs the fused ops: discovery, defaults and the DIVCO_BACKEND override.

    torch   the readable reference in plain PyTorch (always available; the only one for float64)
    triton  the Triton kernels in divco.kernels (CUDA; on the CPU only under TRITON_INTERPRET=1)
    cpu     the native extension divco._C, CPU kernels
    cuda    the native extension divco._C, CUDA kernels

Default for a tensor: CPU -> "cpu" if the extension is built, else "torch"; CUDA -> "triton"
if Triton is importable, else "cuda", else "torch". Triton is the CUDA default because the
test suite exercises exactly that kernel code on every run (through Triton's interpreter),
while the CUDA kernels only run on GPU machines. float64 logits always default to "torch"
(the fused kernels accumulate in float32 and refuse float64).

``backend=`` or the environment variable DIVCO_BACKEND overrides the default; asking for a
backend that is not available raises a ValueError (never a silent fallback).

A stale native build (built against another torch, or from older sources: an operator of
NATIVE_OPERATORS missing, or registered with another schema) has one policy: a RuntimeWarning
naming the reason and the rebuild command, and the "cpu" / "cuda" backends unavailable for
every op (:func:`disable_native`), decided at import.
"""

from __future__ import annotations

import os

import torch

from ..vocabulary import BACKENDS
from .validation import FUSED_DTYPES


#: The ops whose ``divco::<op>_native`` operator divco calls: a build lacking one is stale.
NATIVE_OPERATORS = ("cotrain_loss", "ensemble", "ensemble_backward", "batch_norm", "batch_norm_backward",
                    "batch_norm_update_stats")


def _probe_native() -> tuple[bool, str, bool]:
    """(loaded, why not, has CUDA kernels) of the native extension divco._C."""
    from ..native import load_extension, stale_build_reason, warn_unusable  # the one loader

    extension, reason = load_extension()  # importing divco._C registers divco::*_native
    if extension is None:
        return False, reason, False
    missing = [f"divco::{op}_native" for op in NATIVE_OPERATORS if not hasattr(torch.ops.divco, f"{op}_native")]
    if missing:
        reason = stale_build_reason(f"it registers no {', '.join(missing)}")
        warn_unusable(reason)
        return False, reason, False
    return True, "", torch._C._dispatch_has_kernel_for_dispatch_key("divco::cotrain_loss_native", "CUDA")


# divco._C first: its TORCH_LIBRARY(divco, m) defines the namespace before the Triton backend
# adds its divco:: operators from Python.
_NATIVE_LOADED, _NATIVE_REASON, _NATIVE_HAS_CUDA = _probe_native()

from . import triton_backend  # noqa: E402


def _probe_triton() -> dict[str, tuple[bool, str]]:
    """(usable, why not) of the Triton kernels per device type."""
    if triton_backend.TRITON_ERROR:
        status = (False, f"Triton is not usable ({triton_backend.TRITON_ERROR})")
        return {"cuda": status, "cpu": status}
    if triton_backend.KERNELS_INTERPRETED:
        return {
            "cuda": (False, "the Triton kernels were defined under TRITON_INTERPRET=1, which runs them on the CPU only"),
            "cpu": (True, ""),
        }
    return {
        "cuda": (True, ""),
        "cpu": (False, "Triton runs on the CPU only through its interpreter: set TRITON_INTERPRET=1 before importing"),
    }


# Everything that does not depend on the tensors is decided once, here: the calls below run
# inside torch.compile'd code, where probing modules or kernel objects would break the graph.
_TRITON_STATUS = _probe_triton()


def disable_native(reason: str) -> None:
    """The native build is stale (found after the probe: an operator registered with another
    schema): warn with ``reason`` (which names the rebuild) and make "cpu" / "cuda" unavailable
    for every op. Called at import only (op modules registering their operators)."""
    from ..native import warn_unusable

    global _NATIVE_LOADED, _NATIVE_REASON, _NATIVE_HAS_CUDA
    warn_unusable(reason)
    _NATIVE_LOADED, _NATIVE_REASON, _NATIVE_HAS_CUDA = False, reason, False


def native_status() -> tuple[bool, str]:
    """(importable, reason): whether divco._C loaded and registered its operators."""
    return _NATIVE_LOADED, _NATIVE_REASON


def native_has_cuda() -> bool:
    """Whether divco._C holds CUDA kernels (the dispatcher has a CUDA kernel for them)."""
    return _NATIVE_HAS_CUDA


def triton_status(device: torch.device) -> tuple[bool, str]:
    """(usable, why not) of the Triton kernels for tensors on ``device``."""
    return _TRITON_STATUS.get(
        device.type, (False, f"Triton kernels are not available for device type {device.type!r}")
    )


def backend_status(backend: str, device: torch.device) -> tuple[bool, str]:
    """(available, reason it is not) of ``backend`` for tensors on ``device``."""
    if backend == "torch":
        return True, ""
    if backend == "triton":
        return triton_status(device)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return False, f"backend {backend!r} runs on {backend} tensors, the tensors are on {device}"
        ok, reason = native_status()
        if ok and backend == "cuda" and not native_has_cuda():
            return False, "divco._C was built without CUDA kernels"
        return ok, reason
    raise ValueError(f"backend must be one of {BACKENDS} (or None for the default), got {backend!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends usable for tensors on ``device``; the first is the default for float32."""
    device = torch.device(device)
    found = [b for b in BACKENDS if backend_status(b, device)[0]]
    default = default_backend(device, torch.float32)
    return [default] + [b for b in found if b != default]


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    if dtype not in FUSED_DTYPES:
        return "torch"
    order = ("cpu",) if device.type == "cpu" else ("triton", "cuda") if device.type == "cuda" else ()
    for backend in order:
        if backend_status(backend, device)[0]:
            return backend
    return "torch"


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend to run: ``backend``, else DIVCO_BACKEND, else the default for device and dtype."""
    source = "backend"
    if backend is None:
        backend = os.environ.get("DIVCO_BACKEND") or None
        source = "DIVCO_BACKEND"
    if backend is None:
        return default_backend(device, dtype)
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    ok, reason = backend_status(backend, device)
    if not ok:
        raise ValueError(f"{source}={backend!r} is not available for tensors on {device}: {reason}")
    if backend != "torch" and dtype not in FUSED_DTYPES:
        raise ValueError(
            f"{source}={backend!r} takes float32, bfloat16 or float16 logits, got {dtype}; use backend='torch'"
        )
    return backend
