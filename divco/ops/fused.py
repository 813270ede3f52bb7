"""Autograd (and, for the native operators, fake kernels) shared by every fused backend.

The fused co-training operator computes dloss/dlogits during its forward pass and returns
it as its last output; backward only scales that tensor by grad_output (no second pass
over the logits). Only the loss is differentiable (w.r.t. the logits and the weight);
ce, cot, ensemble and correct are returned detached by divco.ops.cotrain_loss.
Double backward is refused with a RuntimeError (the saved gradient is a constant to
autograd, so it would silently be 0); the torch backend supports it.

The ensemble operators differentiate through their own backward operator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schema import op_name, qualified_name

# -- cotrain_loss ----------------------------------------------------------------------------


def _refuse_double_backward(op: str, suffix: str, device: torch.device) -> None:
    """The fused backward is a constant to autograd: differentiating it again (create_graph=True,
    e.g. a gradient penalty) would silently give 0, so refuse it."""
    if torch.is_grad_enabled():
        backend = "triton" if suffix == "triton" else device.type
        raise RuntimeError(
            f"divco.ops.{op} with backend={backend!r} does not support higher-order gradients "
            "(backward with create_graph=True); use backend='torch' for those"
        )


def _cotrain_setup_context(ctx, inputs, output) -> None:
    logits, target, weight, kind, temperature, compute_grad = inputs
    loss, ce, cot, ensemble, correct, grad = output
    ctx.compute_grad = compute_grad
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(grad, cot)


def _cotrain_backward_for(suffix: str):
    def backward(ctx, grad_loss, grad_ce, grad_cot, grad_ensemble, grad_correct, grad_grad):
        grad, cot = ctx.saved_tensors
        _refuse_double_backward("cotrain_loss", suffix, grad.device)
        grad_logits = grad_weight = None
        if ctx.needs_input_grad[0]:
            if not ctx.compute_grad:
                raise RuntimeError(
                    "cotrain_loss was called with compute_grad=False, so it stored no gradient; "
                    "call divco.ops.cotrain_loss with grad mode enabled to differentiate it"
                )
            # Multiply in float32 and cast last: a GradScaler's grad_loss (65536) overflows
            # float16, and the stored gradient (float32 for float16 logits on Triton) would
            # flush to zero if rounded to float16 before the scale.
            grad_logits = (grad.to(torch.float32) * grad_loss.to(torch.float32)).to(ctx.logits_dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = grad_loss * cot
        return grad_logits, None, grad_weight, None, None, None

    return backward


def _cotrain_fake_for(grad_dtype):
    def fake(logits: Tensor, target: Tensor, weight: Tensor, kind: str, temperature: float, compute_grad: bool):
        N, S, K = logits.shape
        f32 = dict(dtype=torch.float32, device=logits.device)
        return (
            logits.new_empty((), **f32),
            logits.new_empty((S,), **f32),
            logits.new_empty((), **f32),
            logits.new_empty((N, K)),
            logits.new_empty((S + 1,), dtype=torch.int64),
            logits.new_empty((N, S, K) if compute_grad else (0,), dtype=grad_dtype(logits.dtype)),
        )

    return fake


# -- ensemble --------------------------------------------------------------------------------


def _ensemble_setup_context(ctx, inputs, output) -> None:
    logits, mode = inputs
    ctx.mode = mode
    ctx.save_for_backward(logits)


def _ensemble_backward_for(backend: str):
    backward_op = getattr(torch.ops.divco, op_name("ensemble_backward", backend))

    def backward(ctx, grad_out):
        (logits,) = ctx.saved_tensors
        _refuse_double_backward("ensemble", backend, logits.device)
        return backward_op(grad_out, logits, ctx.mode), None

    return backward


def _ensemble_fake(logits: Tensor, mode: str) -> Tensor:
    N, S, K = logits.shape
    return logits.new_empty((N, K))


def _ensemble_backward_fake(grad_out: Tensor, logits: Tensor, mode: str) -> Tensor:
    return logits.new_empty(logits.shape)


# -- registration ----------------------------------------------------------------------------

_registered: set[str] = set()


def register(backend: str, *, fakes: bool, grad_dtype=lambda logits_dtype: logits_dtype) -> None:
    """Register autograd for ``divco::*_<backend>`` (and fake kernels when ``fakes``; triton_op
    operators already have theirs). ``grad_dtype(logits dtype)``: dtype of the stored gradient
    the co-training operator returns. Idempotent."""
    if backend in _registered:
        return
    cotrain = qualified_name("cotrain_loss", backend)
    ensemble = qualified_name("ensemble", backend)
    ensemble_backward = qualified_name("ensemble_backward", backend)
    if fakes:
        torch.library.register_fake(cotrain, _cotrain_fake_for(grad_dtype))
        torch.library.register_fake(ensemble, _ensemble_fake)
        torch.library.register_fake(ensemble_backward, _ensemble_backward_fake)
    torch.library.register_autograd(cotrain, _cotrain_backward_for(backend), setup_context=_cotrain_setup_context)
    torch.library.register_autograd(
        ensemble, _ensemble_backward_for(backend), setup_context=_ensemble_setup_context
    )
    _registered.add(backend)
