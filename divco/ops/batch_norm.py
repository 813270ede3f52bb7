"""Fused branch-wise BatchNorm: ``act(batch_norm(x) + residual)`` in one op, every backend.

    y = divco.ops.batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                             training=True, momentum=0.1, residual=identity, activation="relu")

With S branches side by side in the channel dimension, per-branch BatchNorm is BatchNorm
over S·C_branch channels, so one op serves every branch at once. Everything about the op
lives in this file: the public function, the operator contract (schemas), input checks, the
Triton launchers, the fake kernels and the autograd formula. The C++ and CUDA kernels
(csrc/divco/ops/{cpu,cuda}/batch_norm_kernel.*, per-channel math in
csrc/divco/batch_norm_math.h) register ``divco::batch_norm_native`` with the same schemas.

Operators (``<b>`` is ``native`` or ``triton``):

batch_norm_<b>(x, weight, bias, running_mean, running_var, residual, training, eps, relu)
        -> (out, mean, var)
    x         [N, C, H, W] float32/bfloat16/float16, contiguous or channels_last
    weight, bias      float32 [C] or None;  running_mean, running_var  float32 [C] or None
                      (read in eval only: the running update is the caller's, see below)
    residual  None or x's shape and dtype (added before the activation)
    out       x's shape, dtype and strides;  mean, var  float32 [C]: the batch mean and biased
              variance in training, shape [0] in eval (backward then reads the running stats)
batch_norm_backward_<b>(grad_out, x, out, weight, mean, var, training, eps, relu, residual_grad)
        -> (grad_x, grad_residual, grad_weight, grad_bias)
    out       the forward's output, read only for the ReLU mask (None without activation)
    mean, var the batch statistics (training) or the running statistics (eval)
    grad_residual  dy' = grad_out·[out > 0], written only when relu and residual_grad (else [0])
    grad_weight, grad_bias  float32 [C]: Σ dy'·x̂ and Σ dy'

Backward saves x, the output (only with ReLU: the mask is recomputed from it, so neither the
BN output nor a mask is kept) and the per-channel statistics; it makes one reduction pass
(Σdy', Σdy'·x̂ together) and one elementwise pass that writes dx and the residual's gradient.

The running statistics are updated by :func:`batch_norm` after the op, in place, exactly as
``F.batch_norm`` does: ``r = (1 - momentum)·r + momentum·s`` with the unbiased variance. The
op itself is functional (no mutated arguments), so autograd, opcheck and torch.compile see a
pure function; the update is two small in-place ops on [C] tensors, with no host sync.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from typing import Optional

from . import backends, registration, triton_backend
from .reference import batch_norm as reference_batch_norm
from .schema import declare, op_name, operator, qualified_name  # noqa: F401  (qualified_name: for tests and users)

#: The activations applied after the (optional) residual add.
ACTIVATIONS: tuple[str | None, ...] = (None, "relu")

BATCH_NORM_SCHEMA = declare("batch_norm", 
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, Tensor? residual, "
    "bool training, float eps, bool relu) -> (Tensor out, Tensor mean, Tensor var)"
)
BATCH_NORM_BACKWARD_SCHEMA = declare("batch_norm_backward", 
    "(Tensor grad_out, Tensor x, Tensor? out, Tensor? weight, Tensor mean, Tensor var, bool training, "
    "float eps, bool relu, bool residual_grad) -> (Tensor grad_x, Tensor grad_residual, Tensor grad_weight, "
    "Tensor grad_bias)"
)


# -- checks ------------------------------------------------------------------------------------


def _check_vector(name: str, t: object, x: Tensor) -> None:
    if t is None:
        return
    C = x.shape[1]
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a Tensor or None; got {type(t).__name__}")
    if t.shape != (C,):
        raise ValueError(f"{name} must have shape [C] = [{C}] (x's channels); got {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}; expected one device")


def check_inputs(x, weight, bias, running_mean, running_var, residual, training: bool, activation) -> None:
    """ValueError naming what was expected and what came, for anything the op cannot take."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W]; got shape {list(x.shape)}")
    if x.dtype not in backends.FUSED_DTYPES + (torch.float64,):
        raise ValueError(f"x must be float32, bfloat16, float16 or float64; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty; got shape {list(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("eval mode (training=False) normalises with the running statistics: "
                         "running_mean and running_var are required; got None")
    N, C, H, W = x.shape
    if training and N * H * W == 1:
        raise ValueError(f"training needs more than one value per channel (N·H·W > 1); got shape {list(x.shape)}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise ValueError(f"residual must be a Tensor or None; got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {list(x.shape)}; got {list(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype {x.dtype}; got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}; expected one device")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")


def memory_format_of(x: Tensor) -> torch.memory_format:
    """contiguous_format or channels_last: the layouts the kernels take."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_operator_operands(x: Tensor, weight, bias, mean, var) -> None:
    """The operators can be called directly (torch.ops.divco.*): refuse what the kernels cannot do."""
    if x.dim() != 4 or x.dtype not in backends.FUSED_DTYPES:
        raise ValueError(f"x must be 4-D float32/bfloat16/float16; got {x.dtype} of shape {list(x.shape)}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("x must be contiguous or channels_last contiguous")
    for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
        if t is not None and (t.dtype != torch.float32 or t.shape != (x.shape[1],)):
            raise ValueError(f"{name} must be float32 [{x.shape[1]}]; got {t.dtype} {list(t.shape)}")


def _like(t: Tensor | None, x: Tensor) -> Tensor | None:
    """``t`` in x's memory format (a no-op when it already is)."""
    if t is None:
        return None
    fmt = memory_format_of(x)
    return t if t.is_contiguous(memory_format=fmt) and t.stride() == x.stride() else t.contiguous(memory_format=fmt)


# -- fake kernels and autograd (shared by the native and Triton operators) ----------------------


def _forward_fake(x, weight, bias, running_mean, running_var, residual, training, eps, relu):
    stats = (x.shape[1],) if training else (0,)
    return torch.empty_like(x), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


def _backward_fake(grad_out, x, out, weight, mean, var, training, eps, relu, residual_grad):
    C = x.shape[1]
    residual_shape = x.shape if relu and residual_grad else (0,)
    return (
        torch.empty_like(x),
        torch.empty_like(x) if relu and residual_grad else x.new_empty(residual_shape),
        x.new_empty((C,), dtype=torch.float32),
        x.new_empty((C,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, running_mean, running_var, residual, training, eps, relu = inputs
    out, mean, var = output
    stats = (mean, var) if training else (running_mean, running_var)
    ctx.save_for_backward(x, out if relu else None, weight, *stats)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu


def _backward_for(suffix: str):
    backward_op = getattr(torch.ops.divco, op_name("batch_norm_backward", suffix))

    def backward(ctx, grad_out, grad_mean, grad_var):
        x, out, weight, mean, var = ctx.saved_tensors
        registration.refuse_double_backward("batch_norm", suffix, x.device)
        need_x, need_weight, need_bias, _, _, need_residual = ctx.needs_input_grad[:6]
        write_residual = ctx.relu and need_residual
        grad_x, grad_residual, grad_weight, grad_bias = backward_op(
            grad_out, x, out, weight, mean, var, ctx.training, ctx.eps, ctx.relu, write_residual
        )
        if need_residual and not ctx.relu:
            grad_residual = grad_out
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias if need_bias else None,
            None,
            None,
            grad_residual if need_residual else None,
            None,
            None,
            None,
        )

    return backward


def _register(suffix: str) -> None:
    registration.register("batch_norm_backward", suffix, fake=_backward_fake)
    registration.register("batch_norm", suffix, fake=_forward_fake, backward=_backward_for(suffix),
                          setup_context=_setup_context)


# -- the Triton launchers ------------------------------------------------------------------------

from .triton_backend import TRITON_ERROR  # noqa: E402

if not TRITON_ERROR:
    import triton
    from torch.library import wrap_triton

    from ..kernels.batch_norm import (
        bn_backward_kernel,
        bn_finalize_kernel,
        bn_forward_kernel,
        bn_partial_sums_kernel,
    )

#: Elements one program holds in a tile; programs the reductions aim for (a few per SM).
TILE_ELEMENTS = 2048
REDUCTION_PROGRAMS = 512


def tile_shape(x: Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): long along the contiguous axis (HW in NCHW, C in channels_last)."""
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    if memory_format_of(x) == torch.channels_last:
        block_c = min(triton.next_power_of_2(C), 64)
        return block_c, min(triton.next_power_of_2(HW), max(1, TILE_ELEMENTS // block_c))
    block_hw = min(triton.next_power_of_2(HW), 512)
    return min(triton.next_power_of_2(C), max(1, TILE_ELEMENTS // block_hw)), block_hw


def _view(x: Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, C, HW, stride_n, stride_c, stride_hw) of the [N, C, HW] view both layouts allow."""
    N, C, H, W = x.shape
    return N, C, H * W, x.stride(0), x.stride(1), x.stride(3)


def _partial_sums(x, grad, out, mean, backward: bool, relu: bool, block_c: int, block_hw: int) -> tuple[Tensor, int]:
    N, C, HW, sn, sc, shw = _view(x)
    c_tiles = triton.cdiv(C, block_c)
    batches_per_chunk = triton.cdiv(N, min(N, max(1, REDUCTION_PROGRAMS // c_tiles)))
    chunks = triton.cdiv(N, batches_per_chunk)
    partial = torch.empty((chunks, 2, C), dtype=torch.float32, device=x.device)
    wrap_triton(bn_partial_sums_kernel)[(c_tiles, chunks)](
        x, grad, out, mean, partial, N, C, HW, sn, sc, shw, batches_per_chunk,
        BACKWARD=backward, RELU=relu, BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return partial, chunks


def _finalize_block(C: int) -> int:
    return min(triton.next_power_of_2(C), 1024)


def batch_norm_triton_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], residual: Optional[Tensor], training: bool, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_operator_operands(x, weight, bias, running_mean, running_var)
    N, C, HW, sn, sc, shw = _view(x)
    residual = _like(residual, x)
    out = torch.empty_like(x)
    block_c, block_hw = tile_shape(x)
    with triton_backend.device_guard(x.device), triton_backend.quiet_interpreter():
        if training:
            partial, chunks = _partial_sums(x, x, x, x, False, False, block_c, block_hw)
            mean = torch.empty((C,), dtype=torch.float32, device=x.device)
            var = torch.empty_like(mean)
            fin = _finalize_block(C)
            wrap_triton(bn_finalize_kernel)[(triton.cdiv(C, fin),)](
                x, partial, mean, mean, var, C, chunks, sc, float(N * HW), eps, BACKWARD=False, BLOCK_C=fin,
            )
            stats_mean, stats_var = mean, var
        else:
            stats_mean, stats_var = running_mean, running_var
            mean, var = x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32)
        wrap_triton(bn_forward_kernel)[(triton.cdiv(C, block_c), N, triton.cdiv(HW, block_hw))](
            x, residual if residual is not None else x, out, stats_mean, stats_var,
            weight if weight is not None else stats_mean, bias if bias is not None else stats_mean,
            C, HW, sn, sc, shw, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            RELU=relu, BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
    return out, mean, var


def batch_norm_backward_triton_impl(
    grad_out: Tensor, x: Tensor, out: Optional[Tensor], weight: Optional[Tensor], mean: Tensor, var: Tensor,
    training: bool, eps: float, relu: bool, residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_operator_operands(x, weight, None, mean, var)
    if relu and out is None:
        raise ValueError("batch_norm_backward with relu=True needs the forward's output (the ReLU mask)")
    N, C, HW, sn, sc, shw = _view(x)
    grad_out = _like(grad_out.to(x.dtype), x)
    out = _like(out, x)
    block_c, block_hw = tile_shape(x)
    grad_x = torch.empty_like(x)
    write_residual = relu and residual_grad
    grad_residual = torch.empty_like(x) if write_residual else x.new_empty((0,))
    grad_bias = torch.empty((C,), dtype=torch.float32, device=x.device)
    grad_weight = torch.empty_like(grad_bias)
    with triton_backend.device_guard(x.device), triton_backend.quiet_interpreter():
        partial, chunks = _partial_sums(x, grad_out, out if relu else x, mean, True, relu, block_c, block_hw)
        fin = _finalize_block(C)
        wrap_triton(bn_finalize_kernel)[(triton.cdiv(C, fin),)](
            x, partial, var, grad_bias, grad_weight, C, chunks, sc, float(N * HW), eps, BACKWARD=True, BLOCK_C=fin,
        )
        wrap_triton(bn_backward_kernel)[(triton.cdiv(C, block_c), N, triton.cdiv(HW, block_hw))](
            grad_out, x, out if relu else x, mean, var, weight if weight is not None else mean,
            grad_bias, grad_weight, grad_x, grad_residual if write_residual else grad_x,
            C, HW, sn, sc, shw, float(N * HW), eps,
            TRAINING=training, HAS_WEIGHT=weight is not None, RELU=relu, WRITE_RESIDUAL=write_residual,
            BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
    return grad_x, grad_residual, grad_weight, grad_bias


def native_available() -> tuple[bool, str]:
    ok, reason = backends.native_status()
    if ok and not hasattr(torch.ops.divco, op_name("batch_norm", "native")):
        return False, "divco._C was built without divco::batch_norm_native (rebuild the extension)"
    return ok, reason


if not TRITON_ERROR:
    batch_norm_triton = triton_backend.define("batch_norm")(batch_norm_triton_impl)
    batch_norm_backward_triton = triton_backend.define("batch_norm_backward")(batch_norm_backward_triton_impl)

for _suffix in registration.defined_suffixes():
    if _suffix != "native" or native_available()[0]:  # an extension older than this op: torch fallback
        _register(_suffix)


# -- the public function --------------------------------------------------------------------------


def _resolve_backend(backend: str | None, x: Tensor) -> str:
    resolved = backends.resolve_backend(backend, x.device, x.dtype)
    if resolved in ("cpu", "cuda"):
        ok, reason = native_available()
        if not ok:
            if backend is None and os.environ.get("DIVCO_BACKEND") is None:
                return "torch"  # the default, where the extension predates this op: the same function
            raise ValueError(f"backend {resolved!r} is not available for batch_norm: {reason}")
    return resolved


def _reference(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, activation):
    return reference_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, residual, activation
    )


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> Tensor:
    """``act(batch_norm(x) + residual)``, BatchNorm over every channel of x [N, C, H, W].

    Same semantics as ``F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps)`` followed by ``+ residual`` and ``activation`` ("relu" or None): in
    training, the batch statistics normalise and the running statistics (when given) are
    updated in place with the unbiased variance; in eval the running statistics normalise.
    x is float32/bfloat16/float16 (statistics in float32) or float64 (torch backend), NCHW
    or channels_last (the output keeps x's layout; other strides are made contiguous).
    Differentiable in x, weight, bias and residual. ``backend``: "torch", "triton", "cpu",
    "cuda" or None (DIVCO_BACKEND, else the default of divco.ops.backends).
    """
    check_inputs(x, weight, bias, running_mean, running_var, residual, training, activation)
    backend = _resolve_backend(backend, x)
    if backend == "torch":
        return _reference(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, activation)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    f32 = torch.float32
    op = operator("batch_norm", backend)
    out, mean, var = op(
        x,
        weight if weight is None or weight.dtype == f32 else weight.to(f32),
        bias if bias is None or bias.dtype == f32 else bias.to(f32),
        None if training else (running_mean if running_mean.dtype == f32 else running_mean.to(f32)),
        None if training else (running_var if running_var.dtype == f32 else running_var.to(f32)),
        _like(residual, x),
        training,
        eps,
        activation == "relu",
    )
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    return out


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float, count: int
) -> None:
    """In place, as F.batch_norm: r = (1 - momentum)·r + momentum·s, variance unbiased (count/(count-1))."""
    unbiased = var * (count / (count - 1))
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
