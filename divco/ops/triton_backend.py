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

from .backends import FUSED_DTYPES
from .schema import COTRAIN_LOSS_SCHEMA, ENSEMBLE_BACKWARD_SCHEMA, ENSEMBLE_SCHEMA, qualified_name
from .validation import check_kind, check_logits, check_mode

try:
    import triton
    from torch.library import triton_op, wrap_triton

    from ..kernels.cotrain import cotrain_loss_kernel
    from ..kernels.ensemble import MODE_IDS, ensemble_backward_kernel, ensemble_kernel
except Exception as error:  # noqa: BLE001  (any failure means: no Triton backend, with the reason)
    TRITON_ERROR = f"{type(error).__name__}: {error}"
else:
    TRITON_ERROR = ""

#: Largest tile (branches x classes) one program holds; classes beyond it are walked in tiles.
MAX_TILE_ELEMENTS = 4096


def kernels_interpreted() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (they then run on the CPU)."""
    if TRITON_ERROR:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(cotrain_loss_kernel, InterpretedFunction)


@contextlib.contextmanager
def _quiet_interpreter():
    """The interpreter evaluates masked-off lanes too (log 0, -inf - -inf) with numpy, which
    warns; those lanes are never stored, so the warnings are noise. (Compiled kernels: no-op.)"""
    if not kernels_interpreted():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _check_operands(logits: Tensor, kind: str = "js", mode: str = "mean_logits") -> None:
    """The operators can be called directly (torch.ops.divco.*): refuse what the kernels cannot do."""
    check_logits(logits)
    check_kind(kind)
    check_mode(mode)
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


def _define(base: str, schema: str):
    """triton_op on a GPU; an opaque custom_op when the kernels are interpreted on the CPU."""
    define = torch.library.custom_op if kernels_interpreted() else triton_op
    return define(qualified_name(base, "triton"), mutates_args=(), schema=schema)


if not TRITON_ERROR:

    @_define("cotrain_loss", COTRAIN_LOSS_SCHEMA)
    def cotrain_loss_triton(
        logits: Tensor, target: Tensor, weight: Tensor, kind: str, temperature: float, compute_grad: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        _check_operands(logits, kind=kind)
        N, S, K = logits.shape
        device = logits.device
        soft = target.is_floating_point()
        ensemble = torch.empty((N, K), dtype=logits.dtype, device=device)
        grad = torch.empty((N, S, K) if compute_grad else (0,), dtype=logits.dtype, device=device)
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
        with _quiet_interpreter():
            wrap_triton(cotrain_loss_kernel)[(N,)](
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                target, target_strides[0], target_strides[1],
                weight,
                ensemble, grad if compute_grad else ensemble,
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

    @_define("ensemble", ENSEMBLE_SCHEMA)
    def ensemble_triton(logits: Tensor, mode: str) -> Tensor:
        _check_operands(logits, mode=mode)
        N, S, K = logits.shape
        out = torch.empty((N, K), dtype=logits.dtype, device=logits.device)
        block_s, block_k, num_warps = tile_shape(S, K)
        with _quiet_interpreter():
            wrap_triton(ensemble_kernel)[(N,)](
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                out, S, K,
                MODE=MODE_IDS[mode],
                NORMALISED=mode in ("mean_probs", "geo_mean"),
                BLOCK_S=block_s,
                BLOCK_K=block_k,
                num_warps=num_warps,
            )
        return out

    @_define("ensemble_backward", ENSEMBLE_BACKWARD_SCHEMA)
    def ensemble_triton_backward(grad_out: Tensor, logits: Tensor, mode: str) -> Tensor:
        _check_operands(logits, mode=mode)
        N, S, K = logits.shape
        grad_out = grad_out.contiguous()
        grad = torch.empty((N, S, K), dtype=logits.dtype, device=logits.device)
        block_s, block_k, num_warps = tile_shape(S, K)
        with _quiet_interpreter():
            wrap_triton(ensemble_backward_kernel)[(N,)](
                grad_out,
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                grad, S, K,
                MODE=MODE_IDS[mode],
                NORMALISED=mode in ("mean_probs", "geo_mean"),
                BLOCK_S=block_s,
                BLOCK_K=block_k,
                num_warps=num_warps,
            )
        return grad


