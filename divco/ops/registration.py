"""torch.library registration shared by every fused op: autograd and fake kernels of its
``divco::<op>_native`` and ``divco::<op>_triton`` operators, and the errors they raise. A
native operator that is missing or has another schema than the op declares makes the native
backend unavailable with a warning (divco.ops.backends.disable_native), never an import error.

The native operators come from C++ without fakes or autograd; the Triton ones are defined in
Python (divco.ops.triton_backend.define) and need fakes only when interpreted. An op module
calls :func:`register` once per suffix in :func:`defined_suffixes`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..native import stale_build_reason
from . import backends, triton_backend
from .schema import full_schema, qualified_name, signature


def defined_suffixes() -> tuple[str, ...]:
    """The operator suffixes whose operators exist in this process: "native" when divco._C
    loaded, "triton" when the Triton kernels import."""
    native = ("native",) if backends.native_status()[0] else ()
    return native + (() if triton_backend.TRITON_ERROR else ("triton",))


def needs_fake(suffix: str) -> bool:
    """Native operators have no fake kernel; triton_op traces its launcher, custom_op does not."""
    return suffix == "native" or triton_backend.KERNELS_INTERPRETED


_registered: set[str] = set()


def register(base: str, suffix: str, *, fake: Callable | None = None,
             backward: Callable | None = None, setup_context: Callable | None = None) -> None:
    """Fake kernel (when the operator needs one) and autograd (when ``backward`` is given) for
    ``divco::<base>_<suffix>``. Idempotent."""
    name = qualified_name(base, suffix)
    if name in _registered:
        return
    if suffix == "native":
        if not backends.native_status()[0]:  # found stale by an earlier operator: nothing to register
            return
        stale = _stale_native_operator(base)
        if stale:
            backends.disable_native(stale_build_reason(stale))
            return
    if fake is not None and needs_fake(suffix):
        torch.library.register_fake(name, fake)
    if backward is not None:
        torch.library.register_autograd(name, backward, setup_context=setup_context)
    _registered.add(name)


def _stale_native_operator(base: str) -> str:
    """What is out of date about ``divco::<base>_native`` in the loaded divco._C ("" if nothing)."""
    name = qualified_name(base, "native")
    if not hasattr(torch.ops.divco, name.split("::")[1]):
        return f"it registers no {name}"
    registered = str(getattr(torch.ops.divco, name.split("::")[1]).default._schema)
    if signature(registered) != signature(full_schema(base, "native")):
        return f"it registers {registered}, divco expects {full_schema(base, 'native')}"
    return ""


def refuse_double_backward(op: str, suffix: str, device: torch.device) -> None:
    """A fused backward is a constant to autograd: differentiating it again (create_graph=True,
    e.g. a gradient penalty) would silently give 0, so it is an error instead."""
    if torch.is_grad_enabled():
        backend = "triton" if suffix == "triton" else device.type
        raise RuntimeError(
            f"divco.ops.{op} with backend={backend!r} does not support higher-order gradients "
            "(backward with create_graph=True); use backend='torch' for those"
        )
