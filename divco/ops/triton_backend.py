"""The Triton backend's shared pieces: whether Triton is usable, and how its ops are launched.

Each op's launcher lives in its own module (divco/ops/<op>.py) and is defined with
:func:`define`: torch.library.triton_op on a GPU, so torch.compile sees the kernels (no graph
break) and the launcher itself serves as the fake kernel; under TRITON_INTERPRET=1 the kernels
are Python functions run on the CPU, which triton_op cannot trace, so the launchers become
opaque torch.library.custom_op operators with explicit fake kernels and torch.compile
(fullgraph=True) still works. Launchers run under :func:`device_guard` and
:func:`quiet_interpreter`, and size their tiles with :func:`tile_shape`.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

from .schema import qualified_name
from .validation import FUSED_DTYPES, check_logits


def _import_triton() -> str:
    """"" if Triton is usable, else why not. A missing divco.kernels is not "no Triton" but a
    broken install, and raises (run from a checkout without ``pip install -e .``)."""
    try:
        import triton  # noqa: F401
        from torch.library import triton_op, wrap_triton  # noqa: F401
    except Exception as error:  # noqa: BLE001  (any failure means: no Triton backend, with the reason)
        return f"{type(error).__name__}: {error}"
    try:
        import divco.kernels  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name not in ("divco.kernels",):
            raise
        raise ImportError(
            "divco.kernels (the Triton kernels, kernels/ in the source tree) is missing: divco is not "
            "installed; run `pip install -e .` in the checkout (a packaging error, not a missing Triton)"
        ) from error
    return ""


TRITON_ERROR = _import_triton()
if not TRITON_ERROR:
    import triton
    from torch.library import triton_op, wrap_triton
    from triton.runtime.interpreter import InterpretedFunction

    from ..kernels.cotrain_loss import cotrain_loss_kernel

    #: Whether the kernels were defined under TRITON_INTERPRET=1 (they then run on the CPU).
    #: Decided once, here: an isinstance on a kernel inside a traced call breaks torch.compile
    #: before torch 2.12 (Dynamo cannot answer it for a TritonKernelVariable).
    KERNELS_INTERPRETED: bool = isinstance(cotrain_loss_kernel, InterpretedFunction)
    del cotrain_loss_kernel
else:
    KERNELS_INTERPRETED = False

#: Largest tile (branches x classes) one program holds; classes beyond it are walked in tiles.
MAX_TILE_ELEMENTS = 4096


def kernels_interpreted() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (they then run on the CPU)."""
    return KERNELS_INTERPRETED


@contextlib.contextmanager
def quiet_interpreter():
    """The interpreter evaluates masked-off lanes too (log 0, -inf - -inf) with numpy, which
    warns; those lanes are never stored, so the warnings are noise. (Compiled kernels: no-op.)"""
    if not KERNELS_INTERPRETED:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def device_guard(device: torch.device):
    """Make ``device`` current while launching: a Triton launch goes to the current device and
    its stream, so tensors on cuda:1 with cuda:0 current would otherwise run on the wrong GPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_operands(logits: Tensor) -> None:
    """The operators can be called directly (torch.ops.divco.*): refuse logits the kernels cannot take."""
    check_logits(logits)
    if logits.dtype not in FUSED_DTYPES:
        raise ValueError(f"the Triton kernels take float32, bfloat16 or float16 logits, got {logits.dtype}")


def tile_shape(S: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_K, num_warps): all branches at once, as many classes as fit."""
    block_s = triton.next_power_of_2(S)
    block_k = min(triton.next_power_of_2(K), max(16, MAX_TILE_ELEMENTS // block_s))
    elements = block_s * block_k
    # about 8-16 elements per thread: tiny rows (K = 10) do not occupy idle warps
    num_warps = 1 if elements <= 256 else 2 if elements <= 1024 else 4 if elements <= 2048 else 8
    return block_s, block_k, num_warps


def define(base: str, mutates_args: tuple[str, ...] = ()):
    """triton_op on a GPU; an opaque custom_op when the kernels are interpreted on the CPU.
    ``mutates_args``: the arguments the operator writes in place (``Tensor(a!)`` in the schema).

    The schema is inferred from the launcher's annotations (torch 2.11 ignores ``schema=`` for
    triton_op and infers it anyway), so it is the same on torch 2.5-2.14; see
    divco.ops.schema.signature for what matches the contract."""
    define = torch.library.custom_op if KERNELS_INTERPRETED else triton_op
    return define(qualified_name(base, "triton"), mutates_args=mutates_args)
