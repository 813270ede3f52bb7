"""The Triton backend: divco::cotrain_loss_triton, divco::ensemble_triton(_backward).

Registered with torch.library.triton_op, so torch.compile sees the kernels (no graph
break) and the launcher itself serves as the fake kernel. Under TRITON_INTERPRET=1 the
kernels are Python functions run on the CPU, which triton_op cannot trace: there the
launchers become opaque torch.library.custom_op operators with explicit fake kernels
(divco.ops.fused), so torch.compile(fullgraph=True) still works. The schemas are those of
the native operators (divco.ops.schema); autograd is registered in divco.ops.fused.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

from .schema import qualified_name
from .validation import FUSED_DTYPES, check_kind, check_logits, check_mode


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

    from ..kernels.cotrain import cotrain_loss_kernel
    from ..kernels.ensemble import MODE_IDS, NORMALISED_MODES, ensemble_backward_kernel, ensemble_kernel

    #: Whether the kernels were defined under TRITON_INTERPRET=1 (they then run on the CPU).
    #: Decided once, here: an isinstance on a kernel inside a traced call breaks torch.compile
    #: before torch 2.12 (Dynamo cannot answer it for a TritonKernelVariable).
    KERNELS_INTERPRETED: bool = isinstance(cotrain_loss_kernel, InterpretedFunction)
else:
    KERNELS_INTERPRETED = False

#: Largest tile (branches x classes) one program holds; classes beyond it are walked in tiles.
MAX_TILE_ELEMENTS = 4096


def kernels_interpreted() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (they then run on the CPU)."""
    return KERNELS_INTERPRETED


@contextlib.contextmanager
def _quiet_interpreter():
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


def _check_operands(logits: Tensor, kind: str = "js", mode: str = "mean_logits") -> None:
    """The operators can be called directly (torch.ops.divco.*): refuse what the kernels cannot do."""
    check_logits(logits)
    check_kind(kind)
    check_mode(mode)
    if logits.dtype not in FUSED_DTYPES:
        raise ValueError(f"the Triton kernels take float32, bfloat16 or float16 logits, got {logits.dtype}")


def stored_grad_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradient the Triton co-training op stores: float32 for float16 logits (an
    unscaled 1/N-sized gradient underflows float16; GradScaler multiplies it later), else the
    logits dtype."""
    return torch.float32 if logits_dtype == torch.float16 else logits_dtype


def tile_shape(S: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_K, num_warps): all branches at once, as many classes as fit."""
    block_s = triton.next_power_of_2(S)
    block_k = min(triton.next_power_of_2(K), max(16, MAX_TILE_ELEMENTS // block_s))
    elements = block_s * block_k
    # about 8-16 elements per thread: tiny rows (K = 10) do not occupy idle warps
    num_warps = 1 if elements <= 256 else 2 if elements <= 1024 else 4 if elements <= 2048 else 8
    return block_s, block_k, num_warps


def _define(base: str):
    """triton_op on a GPU; an opaque custom_op when the kernels are interpreted on the CPU.

    The schema is inferred from the launcher's annotations (torch 2.11 ignores ``schema=`` for
    triton_op and infers it anyway), so it is the same on torch 2.5-2.14; see
    divco.ops.schema.same_signature for how it matches the contract."""
    define = torch.library.custom_op if KERNELS_INTERPRETED else triton_op
    return define(qualified_name(base, "triton"), mutates_args=())


if not TRITON_ERROR:

    @_define("cotrain_loss")
    def cotrain_loss_triton(
        logits: Tensor, target: Tensor, weight: Tensor, kind: str, temperature: float, compute_grad: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        _check_operands(logits, kind=kind)
        N, S, K = logits.shape
        device = logits.device
        soft = target.is_floating_point()
        ensemble = torch.empty((N, K), dtype=logits.dtype, device=device)
        grad = torch.empty((N, S, K) if compute_grad else (0,), dtype=stored_grad_dtype(logits.dtype), device=device)
        ce_rows = torch.empty((N, S), dtype=torch.float32, device=device)
        cot_rows = torch.empty((N,), dtype=torch.float32, device=device)
        hits = torch.empty((N, S + 1), dtype=torch.int32, device=device)
        block_s, block_k, num_warps = tile_shape(S, K)
        if S == 1:
            cot_coef = 0.0  # one branch has nothing to agree with: J = 0 exactly
        elif kind == "kl":
            cot_coef = S / (S - 1)
        else:
            cot_coef = 1.0 / S
        target_strides = (target.stride(0), target.stride(1)) if soft else (target.stride(0), 0)
        with device_guard(device), _quiet_interpreter():
            wrap_triton(cotrain_loss_kernel)[(N,)](
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                target, target_strides[0], target_strides[1],
                weight,
                ensemble, grad,  # grad has its own buffer, empty (never written) without compute_grad
                ce_rows, cot_rows, hits,
                N, S, K,
                1.0 / temperature, cot_coef,
                SOFT_TARGET=soft,
                KIND_KL=kind == "kl",
                UNIT_TEMPERATURE=temperature == 1.0,
                COMPUTE_GRAD=compute_grad,
                SINGLE_TILE=K <= block_k,
                BLOCK_S=block_s,
                BLOCK_K=block_k,
                num_warps=num_warps,
            )
        ce = ce_rows.sum(0) / N
        cot = cot_rows.sum() / N
        loss = ce.sum() + weight.to(torch.float32) * cot
        correct = hits.sum(0, dtype=torch.int64)
        return loss, ce, cot, ensemble, correct, grad

    @_define("ensemble")
    def ensemble_triton(logits: Tensor, mode: str) -> Tensor:
        _check_operands(logits, mode=mode)
        N, S, K = logits.shape
        out = torch.empty((N, K), dtype=logits.dtype, device=logits.device)
        block_s, block_k, num_warps = tile_shape(S, K)
        with device_guard(logits.device), _quiet_interpreter():
            wrap_triton(ensemble_kernel)[(N,)](
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                out, S, K,
                MODE=MODE_IDS[mode],
                NORMALISED=mode in NORMALISED_MODES,
                BLOCK_S=block_s,
                BLOCK_K=block_k,
                num_warps=num_warps,
            )
        return out

    @_define("ensemble_backward")
    def ensemble_triton_backward(grad_out: Tensor, logits: Tensor, mode: str) -> Tensor:
        _check_operands(logits, mode=mode)
        N, S, K = logits.shape
        grad_out = grad_out.contiguous()
        grad = torch.empty((N, S, K), dtype=logits.dtype, device=logits.device)
        block_s, block_k, num_warps = tile_shape(S, K)
        with device_guard(logits.device), _quiet_interpreter():
            wrap_triton(ensemble_backward_kernel)[(N,)](
                grad_out,
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                grad, S, K,
                MODE=MODE_IDS[mode],
                NORMALISED=mode in NORMALISED_MODES,
                BLOCK_S=block_s,
                BLOCK_K=block_k,
                num_warps=num_warps,
            )
        return grad


