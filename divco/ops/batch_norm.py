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
``F.batch_norm`` does: ``r = (1 - momentum)·r + momentum·s`` with the unbiased variance
(``momentum=None``: the cumulative average, factor 1 / num_batches_tracked computed on the
device). The op itself is functional (no mutated arguments: torch.library cannot register
autograd for a mutating operator), so autograd, opcheck and torch.compile see a pure function;
the update is three in-place ops on [C] tensors, with no host sync.

Inputs are checked once, in Python, for every backend (divco.ops.validation: one rule and one
ValueError wherever the op runs): [C] tensors of x's dtype or float32 (F.batch_norm's rule),
momentum in [0, 1] or None, eps finite and > 0. The public function builds its autograd node
itself (``_FusedBatchNorm`` on the operators' ``.default`` overloads, with the operator's own
formula): torch.library's generic wrapper costs more host time than the rest of a small step.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from typing import Optional

from . import backends, registration, triton_backend, validation
from .reference import batch_norm as reference_batch_norm
from .schema import declare, op_name, operator, qualified_name  # noqa: F401  (qualified_name: for tests and users)

#: The activations applied after the (optional) residual add.
ACTIVATIONS = validation.BATCH_NORM_ACTIVATIONS

BATCH_NORM_SCHEMA = declare("batch_norm", 
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, Tensor? residual, "
    "bool training, float eps, bool relu) -> (Tensor out, Tensor mean, Tensor var)"
)
BATCH_NORM_BACKWARD_SCHEMA = declare("batch_norm_backward", 
    "(Tensor grad_out, Tensor x, Tensor? out, Tensor? weight, Tensor mean, Tensor var, bool training, "
    "float eps, bool relu, bool residual_grad) -> (Tensor grad_x, Tensor grad_residual, Tensor grad_weight, "
    "Tensor grad_bias)"
)
BATCH_NORM_UPDATE_STATS_SCHEMA = declare("batch_norm_update_stats",
    "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, Tensor? num_batches_tracked, "
    "float? momentum, int count) -> ()"
)


# -- checks and layouts ---------------------------------------------------------------------


def check_inputs(x, weight, bias, running_mean, running_var, residual, training: bool, activation,
                 momentum: object = 0.1, eps: object = 1e-5, num_batches_tracked: object = None) -> None:
    """ValueError naming what was expected and what came (divco.ops.validation, one rule for every backend)."""
    validation.check_batch_norm_inputs(x, weight, bias, running_mean, running_var, residual, training, activation,
                                       momentum, eps, num_batches_tracked)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """contiguous_format or channels_last: the layouts the kernels take."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def layout_strides(x: Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_hw) of the [N, C, H·W] view, from the memory format.

    Not x.stride(): PyTorch calls a tensor contiguous whatever the strides of its size-1 dims
    (``randn(2, 3, 1, 5).transpose(2, 3)`` has stride(3) = 5), and these strides address the
    same elements as the canonical ones."""
    N, C, H, W = x.shape
    if memory_format_of(x) == torch.channels_last:
        return H * W * C, 1, C
    return C * H * W, H * W, 1


def empty_in_layout(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh tensor of x's shape in x's memory format with canonical strides (what the kernels
    write and the fake kernels promise), never empty_like's copy of odd size-1 strides."""
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format_of(x))


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
    """``t`` in x's memory format (a no-op when it already is; size-1 strides do not matter)."""
    if t is None:
        return None
    fmt = memory_format_of(x)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


# -- fake kernels and autograd (shared by the native and Triton operators) ----------------------


def _forward_fake(x, weight, bias, running_mean, running_var, residual, training, eps, relu):
    stats = (x.shape[1],) if training else (0,)
    return empty_in_layout(x), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


def _backward_fake(grad_out, x, out, weight, mean, var, training, eps, relu, residual_grad):
    C = x.shape[1]
    residual_shape = x.shape if relu and residual_grad else (0,)
    return (
        empty_in_layout(x),
        empty_in_layout(x) if relu and residual_grad else x.new_empty(residual_shape),
        x.new_empty((C,), dtype=torch.float32),
        x.new_empty((C,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, running_mean, running_var, residual, training, eps, relu = inputs
    out, mean, var = output
    # mean and var are statistics, not differentiable outputs: their gradients are never
    # materialised as zeros (set_materialize_grads), and as non-differentiable tensors they are
    # kept on ctx (save_for_backward would detach each one forward and backward)
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, out if relu else None, weight)
    ctx.stats = (mean, var) if training else (running_mean, running_var)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu


def _backward_for(suffix: str):
    backward_op = getattr(torch.ops.divco, op_name("batch_norm_backward", suffix)).default

    def backward(ctx, grad_out, grad_mean, grad_var):
        x, out, weight = ctx.saved_tensors
        mean, var = ctx.stats
        registration.refuse_double_backward("batch_norm", suffix, x.device)
        need_x, need_weight, need_bias, _, _, need_residual = ctx.needs_input_grad[:6]
        if grad_out is None:  # the output was not used: every gradient is zero, i.e. None
            return (None,) * 9
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


def _update_stats_fake(running_mean, running_var, mean, var, num_batches_tracked, momentum, count) -> None:
    return None


#: The backward formula per operator suffix (registered with the operator, used by _FusedBatchNorm).
_BACKWARDS: dict = {}


def has_cpp_autograd(suffix: str) -> bool:
    """Whether divco._C registers batch_norm_<suffix>'s autograd itself (the native operator of an
    extension that has it: a C++ autograd node, no Python per call)."""
    return suffix == "native" and torch._C._dispatch_has_kernel_for_dispatch_key(
        qualified_name("batch_norm", "native"), "Autograd")


def _register(suffix: str) -> None:
    registration.register("batch_norm_update_stats", suffix, fake=_update_stats_fake)
    registration.register("batch_norm_backward", suffix, fake=_backward_fake)
    _BACKWARDS[suffix] = _backward_for(suffix)
    cpp_autograd = has_cpp_autograd(suffix)
    registration.register("batch_norm", suffix, fake=_forward_fake,
                          backward=None if cpp_autograd else _BACKWARDS[suffix],
                          setup_context=None if cpp_autograd else _setup_context)
    if cpp_autograd:
        _DIRECT_OPS[suffix] = getattr(torch.ops.divco, op_name("batch_norm", suffix)).default


#: suffix -> the forward operator, for the operators whose autograd is C++ (called directly).
_DIRECT_OPS: dict = {}
#: suffix -> the running-statistics update operator, where it exists (filled once at import).
_UPDATE_STATS_OPS: dict = {}


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
        bn_update_stats_kernel,
    )

#: Elements one program holds in a tile; programs the reductions aim for (a few per SM).
TILE_ELEMENTS = 2048
REDUCTION_PROGRAMS = 1024  # as the CUDA kernel's kReductionBlocks
#: Units (sample, H·W tile) per channel tile up to which one program reduces the whole channel
#: tile and finalizes it (a launch fewer: small inputs are host-bound, a few tiles take no time).
SINGLE_CHUNK_UNITS = 8
#: CUDA's grid limits: axis 0 takes 2^31 - 1 programs, axes 1 and 2 only 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def tile_shape(x: Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): long along the contiguous axis (HW in NCHW, C in channels_last)."""
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    if memory_format_of(x) == torch.channels_last:
        block_c = min(_next_power_of_2(C), 64)
        return block_c, min(_next_power_of_2(HW), max(1, TILE_ELEMENTS // block_c))
    block_hw = min(_next_power_of_2(HW), 512)
    return min(_next_power_of_2(C), max(1, TILE_ELEMENTS // block_hw)), block_hw


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reduction_grid(shape: tuple[int, int, int, int], block_c: int, block_hw: int) -> tuple[int, int, int]:
    """(channel tiles, chunks, units per chunk) of the partial-sums launch: the N·cdiv(H·W, BLOCK_HW)
    units (sample, H·W tile) split into about REDUCTION_PROGRAMS / channel tiles chunks of
    consecutive units, as the CUDA kernel splits the N·H·W positions (not only the batch)."""
    N, C, H, W = shape
    c_tiles = _cdiv(C, block_c)
    units = N * _cdiv(H * W, block_hw)
    if units <= SINGLE_CHUNK_UNITS:  # one program walks the channel tile: no finalize launch
        return c_tiles, 1, units
    units_per_chunk = _cdiv(units, min(units, max(1, REDUCTION_PROGRAMS // c_tiles)))
    return c_tiles, _cdiv(units, units_per_chunk), units_per_chunk


def elementwise_grid(shape: tuple[int, int, int, int], block_c: int, block_hw: int) -> tuple[int]:
    """One flat axis of channel tiles x units (the kernels split the program id)."""
    N, C, H, W = shape
    return (_cdiv(C, block_c) * N * _cdiv(H * W, block_hw),)


def finalize_grid(C: int) -> tuple[tuple[int], int]:
    block = min(_next_power_of_2(C), 1024)
    return (_cdiv(C, block),), block


def check_grid(grid: tuple[int, ...], shape) -> tuple[int, ...]:
    for axis, (programs, limit) in enumerate(zip(grid, MAX_GRID)):
        if programs > limit:
            raise ValueError(f"batch_norm on shape {list(shape)} needs {programs} programs on grid axis {axis}, "
                             f"more than the {limit} a launch allows")
    return grid


def _reduce(x, grad, out, mean, first, second, var, eps: float, backward: bool, relu: bool, block_c: int,
            block_hw: int) -> None:
    """The reduction of either direction into ``first``/``second`` (forward: mean, biased variance;
    backward: Σdy', Σdy'·x̂ with ``var`` the saved variance): partial sums then finalize, or one
    launch that does both when one program per channel tile covers the input (FINALIZE)."""
    N, C, H, W = x.shape
    sn, sc, shw = layout_strides(x)
    c_tiles, chunks, units_per_chunk = reduction_grid(x.shape, block_c, block_hw)
    single = chunks == 1
    rows = 2 if backward else 3  # forward: mean, variance, count per chunk; backward: two sums
    partial = first if single else torch.empty((chunks, rows, C), dtype=torch.float32, device=x.device)
    wrap_triton(bn_partial_sums_kernel)[check_grid((c_tiles, chunks), x.shape)](
        x, grad, out, mean, partial, first, second, var, C, H * W, sn, sc, shw, N * _cdiv(H * W, block_hw),
        units_per_chunk, eps, BACKWARD=backward, RELU=relu, FINALIZE=single, BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    if not single:
        grid, fin = finalize_grid(C)
        wrap_triton(bn_finalize_kernel)[grid](
            x, partial, first, second, var, C, chunks, sc, eps, BACKWARD=backward, BLOCK_C=fin,
        )


def batch_norm_triton_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], residual: Optional[Tensor], training: bool, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_operator_operands(x, weight, bias, running_mean, running_var)
    N, C, H, W = x.shape
    sn, sc, shw = layout_strides(x)
    # [C] vectors: the kernels index them with stride 1 (a no-op when they are contiguous)
    weight, bias = _dense(weight), _dense(bias)
    residual = _like(residual, x)
    out = empty_in_layout(x)
    block_c, block_hw = tile_shape(x)
    with triton_backend.device_guard(x.device), triton_backend.quiet_interpreter():
        if training:
            mean = torch.empty((C,), dtype=torch.float32, device=x.device)
            var = torch.empty_like(mean)
            _reduce(x, x, x, x, mean, var, var, eps, False, False, block_c, block_hw)
            stats_mean, stats_var = mean, var
        else:
            stats_mean, stats_var = _dense(running_mean), _dense(running_var)
            mean, var = x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32)
        wrap_triton(bn_forward_kernel)[check_grid(elementwise_grid(x.shape, block_c, block_hw), x.shape)](
            x, residual if residual is not None else x, out, stats_mean, stats_var,
            weight if weight is not None else stats_mean, bias if bias is not None else stats_mean,
            C, H * W, sn, sc, shw, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            RELU=relu, BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
    return out, mean, var


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def batch_norm_backward_triton_impl(
    grad_out: Tensor, x: Tensor, out: Optional[Tensor], weight: Optional[Tensor], mean: Tensor, var: Tensor,
    training: bool, eps: float, relu: bool, residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_operator_operands(x, weight, None, mean, var)
    if relu and out is None:
        raise ValueError("batch_norm_backward with relu=True needs the forward's output (the ReLU mask)")
    N, C, H, W = x.shape
    sn, sc, shw = layout_strides(x)
    weight, mean, var = _dense(weight), _dense(mean), _dense(var)
    grad_out = _like(grad_out if grad_out.dtype == x.dtype else grad_out.to(x.dtype), x)
    out = _like(out, x)
    block_c, block_hw = tile_shape(x)
    grad_x = empty_in_layout(x)
    write_residual = relu and residual_grad
    grad_residual = empty_in_layout(x) if write_residual else x.new_empty((0,))
    grad_bias = torch.empty((C,), dtype=torch.float32, device=x.device)
    grad_weight = torch.empty_like(grad_bias)
    with triton_backend.device_guard(x.device), triton_backend.quiet_interpreter():
        _reduce(x, grad_out, out if relu else x, mean, grad_bias, grad_weight, var, eps, True, relu, block_c,
                block_hw)
        wrap_triton(bn_backward_kernel)[check_grid(elementwise_grid(x.shape, block_c, block_hw), x.shape)](
            grad_out, x, out if relu else x, mean, var, weight if weight is not None else mean,
            grad_bias, grad_weight, grad_x, grad_residual if write_residual else grad_x,
            C, H * W, sn, sc, shw, float(N * H * W), eps,
            TRAINING=training, HAS_WEIGHT=weight is not None, RELU=relu, WRITE_RESIDUAL=write_residual,
            BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
    return grad_x, grad_residual, grad_weight, grad_bias


def check_update_stats_operands(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                                num_batches_tracked: Optional[Tensor], momentum: Optional[float], count: int) -> None:
    """What batch_norm_update_stats_<b> takes (the native operator checks the same in C++)."""
    C = running_mean.shape[0] if running_mean.dim() == 1 else -1
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("mean", mean), ("var", var)):
        if t.dtype != torch.float32 or t.dim() != 1 or t.shape[0] != C or not t.is_contiguous():
            raise ValueError(f"batch_norm_update_stats: {name} must be contiguous float32 [C] (C = running_mean's "
                             f"length); got {t.dtype} {list(t.shape)}")
    if count < 2:
        raise ValueError(f"batch_norm_update_stats: count (values per channel) must be >= 2; got {count}")
    if momentum is None:
        _check_num_batches_tracked(num_batches_tracked)
    elif not 0.0 <= momentum <= 1.0:
        raise ValueError(f"batch_norm_update_stats: momentum must be in [0, 1] or None; got {momentum}")


def _check_num_batches_tracked(num_batches_tracked) -> None:
    if (not isinstance(num_batches_tracked, Tensor) or num_batches_tracked.dtype != torch.int64
            or num_batches_tracked.numel() != 1):
        got = (f"{num_batches_tracked.dtype} {list(num_batches_tracked.shape)}"
               if isinstance(num_batches_tracked, Tensor) else type(num_batches_tracked).__name__)
        raise ValueError("momentum=None (the cumulative average) needs num_batches_tracked as a one-element int64 "
                         f"tensor (nn.BatchNorm2d's buffer); got {got}")


def batch_norm_update_stats_triton_impl(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, num_batches_tracked: Optional[Tensor],
    momentum: Optional[float], count: int,
) -> None:
    check_update_stats_operands(running_mean, running_var, mean, var, num_batches_tracked, momentum, count)
    C = running_mean.shape[0]
    grid, block = finalize_grid(C)
    with triton_backend.device_guard(running_mean.device), triton_backend.quiet_interpreter():
        wrap_triton(bn_update_stats_kernel)[grid](
            running_mean, running_var, mean, var,
            num_batches_tracked if num_batches_tracked is not None else running_mean,
            C, 0.0 if momentum is None else float(momentum), count / (count - 1),
            CUMULATIVE=momentum is None, BLOCK_C=block,
        )


def native_available() -> tuple[bool, str]:
    ok, reason = backends.native_status()
    if ok and not hasattr(torch.ops.divco, op_name("batch_norm", "native")):
        return False, "divco._C was built without divco::batch_norm_native (rebuild the extension)"
    return ok, reason


_NATIVE_AVAILABLE = native_available()  # fixed once divco._C is loaded: not looked up per call


if not TRITON_ERROR:
    batch_norm_triton = triton_backend.define("batch_norm")(batch_norm_triton_impl)
    batch_norm_backward_triton = triton_backend.define("batch_norm_backward")(batch_norm_backward_triton_impl)
    batch_norm_update_stats_triton = triton_backend.define(
        "batch_norm_update_stats", mutates_args=("running_mean", "running_var"))(batch_norm_update_stats_triton_impl)

for _suffix in registration.defined_suffixes():
    if _suffix != "native" or native_available()[0]:  # an extension older than this op: torch fallback
        _register(_suffix)
        _update_name = op_name("batch_norm_update_stats", _suffix)
        if hasattr(torch.ops.divco, _update_name):
            _UPDATE_STATS_OPS[_suffix] = getattr(torch.ops.divco, _update_name).default


# -- the public function --------------------------------------------------------------------------


#: (backend, device, dtype, DIVCO_BACKEND) -> the resolved backend: what decides it (the
#: extension's and Triton's availability) is fixed at import, so it is resolved once per key.
_RESOLVED: dict = {}


def resolve_backend(backend: str | None, x: Tensor) -> str:
    key = (backend, x.device, x.dtype, os.environ.get("DIVCO_BACKEND"))
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve_backend(backend, x)
    return resolved


def _resolve_backend(backend: str | None, x: Tensor) -> str:
    resolved = backends.resolve_backend(backend, x.device, x.dtype)
    if resolved in ("cpu", "cuda"):
        ok, reason = _NATIVE_AVAILABLE
        if not ok:
            if backend is None and os.environ.get("DIVCO_BACKEND") is None:
                return "torch"  # the default, where the extension predates this op: the same function
            raise ValueError(f"backend {resolved!r} is not available for batch_norm: {reason}")
    return resolved


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``act(batch_norm(x) + residual)``, BatchNorm over every channel of x [N, C, H, W].

    Same semantics as ``F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps)`` followed by ``+ residual`` and ``activation`` ("relu" or None): in
    training, the batch statistics normalise and the running statistics (when given) are
    updated in place with the unbiased variance; in eval the running statistics normalise.
    ``momentum=None`` is nn.BatchNorm2d's cumulative average: the factor is 1 /
    ``num_batches_tracked`` (a tensor counting this batch too), computed on the device, so the
    step reads nothing back to the host. x is float32/bfloat16/float16 (statistics in float32)
    or float64 (torch backend), NCHW or channels_last (the output keeps x's layout; other
    strides are made contiguous). weight, bias and the running statistics are [C] tensors of
    x's dtype or float32 (F.batch_norm's rule); momentum is in [0, 1] or None, eps > 0 and
    finite: anything else is a ValueError on every backend (divco.ops.validation).
    Differentiable in x, weight, bias and residual. ``backend``: "torch", "triton", "cpu",
    "cuda" or None (DIVCO_BACKEND, else the default of divco.ops.backends).
    """
    check_inputs(x, weight, bias, running_mean, running_var, residual, training, activation,
                 momentum, eps, num_batches_tracked)
    return batch_norm_checked(x, weight, bias, running_mean, running_var, training, momentum, eps, residual,
                              activation, resolve_backend(backend, x), num_batches_tracked)


def batch_norm_checked(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                       running_var: Tensor | None, training: bool, momentum: float | None, eps: float,
                       residual: Tensor | None, activation: str | None, backend: str,
                       num_batches_tracked: Tensor | None = None) -> Tensor:
    """:func:`batch_norm` on inputs :func:`check_inputs` accepted and a resolved ``backend``: the
    dispatch alone, for callers that check once (BranchBatchNorm2d checks its own parameters
    once per module state, not per call)."""
    if backend == "torch":
        if momentum is not None or not training or running_mean is None:
            return reference_batch_norm(x, weight, bias, running_mean, running_var, training, momentum or 0.0,
                                        eps, residual, activation)
        out = reference_batch_norm(x, weight, bias, None, None, True, 0.0, eps, residual, activation)
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3), correction=0)
        update_running_stats(running_mean, running_var, mean, var, None, x.numel() // x.shape[1],
                             num_batches_tracked)
        return out
    if x.is_contiguous():
        canonical = _contiguous_strides(x)
    elif x.is_contiguous(memory_format=torch.channels_last):
        canonical = _channels_last_strides(x)
    else:
        x = x.contiguous()
        canonical = _contiguous_strides(x)
    if x.stride() != canonical:
        x = x.as_strided(x.shape, canonical)  # odd strides of size-1 dims: one layout for every backend
    f32 = torch.float32
    suffix = _OPERATOR_SUFFIX[backend]
    direct = _DIRECT_OPS.get(suffix)
    arguments = (
        x,
        weight if weight is None or weight.dtype == f32 else weight.to(f32),
        bias if bias is None or bias.dtype == f32 else bias.to(f32),
        None if training else (running_mean if running_mean.dtype == f32 else running_mean.to(f32)),
        None if training else (running_var if running_var.dtype == f32 else running_var.to(f32)),
        None if residual is None else _like(residual, x),
        training,
        eps,
        activation == "relu",
    )
    if direct is not None:  # the operator's own (C++) autograd node
        out, mean, var = direct(*arguments)
    else:
        out, mean, var = _FusedBatchNorm.apply(*arguments, suffix)
    if training and running_mean is not None:
        count = x.numel() // x.shape[1]
        if _update_op_takes(running_mean, running_var, suffix):
            # one launch, in place, no host read (momentum=None: the factor is read on the device)
            _UPDATE_STATS_OPS[suffix](running_mean, running_var, mean, var, num_batches_tracked, momentum, count)
        else:
            update_running_stats(running_mean, running_var, mean, var, momentum, count, num_batches_tracked)
    return out


def _update_op_takes(running_mean: Tensor, running_var: Tensor, suffix: str) -> bool:
    """Whether batch_norm_update_stats_<suffix> can update these buffers: float32 and contiguous
    (a branch's slice of the module's buffers is), not requiring grad, with the operator present
    (an extension built before it: the three ATen ops of update_running_stats, the same values)."""
    return (suffix in _UPDATE_STATS_OPS and running_mean.dtype == torch.float32
            and running_var.dtype == torch.float32 and running_mean.is_contiguous() and running_var.is_contiguous()
            and not (running_mean.requires_grad or running_var.requires_grad))


_OPERATOR_SUFFIX = {"triton": "triton", "cpu": "native", "cuda": "native"}


def _contiguous_strides(x: Tensor) -> tuple[int, int, int, int]:
    N, C, H, W = x.shape
    return (C * H * W, H * W, W, 1)


def _channels_last_strides(x: Tensor) -> tuple[int, int, int, int]:
    N, C, H, W = x.shape
    return (H * W * C, 1, W * C, C)


class _FusedBatchNorm(torch.autograd.Function):
    """The public function's autograd node: the operator's own formula (_setup_context,
    _backward_for), without torch.library's generic wrapper, whose per-call argument handling
    (fill_defaults, redispatch) costs more host time than the rest of the step at small sizes.
    The operators keep their registered autograd for direct callers (and opcheck)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, training, eps, relu, suffix):
        # the OpOverload, not the packet: resolving the overload per call costs ~10 µs of host time
        op = getattr(torch.ops.divco, "batch_norm_" + suffix).default
        output = op(x, weight, bias, running_mean, running_var, residual, training, eps, relu)
        _setup_context(ctx, (x, weight, bias, running_mean, running_var, residual, training, eps, relu), output)
        ctx.suffix = suffix
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_var):
        return (*_BACKWARDS[ctx.suffix](ctx, grad_out, grad_mean, grad_var), None)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float | None, count: int,
    num_batches_tracked: Tensor | None = None,
) -> None:
    """In place, as F.batch_norm: r = (1 - f)·r + f·s, variance unbiased (count/(count-1)), with
    f = momentum or, for momentum=None, 1 / num_batches_tracked on the device (no host read).
    Running statistics are buffers (no gradient): the in-place ops need no no_grad context."""
    if running_mean.requires_grad or running_var.requires_grad:
        with torch.no_grad():
            return update_running_stats(running_mean.detach(), running_var.detach(), mean, var, momentum, count,
                                        num_batches_tracked)
    if mean.dtype != running_mean.dtype:
        mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
    if momentum is None:
        _check_num_batches_tracked(num_batches_tracked)
    if momentum is not None:
        # three in-place ops and no temporary (a foreach lerp of both, after unbiasing, takes twice the host time)
        running_mean.lerp_(mean, momentum)
        running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * count / (count - 1))
        return
    factor = num_batches_tracked.reciprocal().to(running_mean.dtype).reshape(())
    running_mean.lerp_(mean, factor)
    running_var.lerp_(var * (count / (count - 1)), factor)
