"""Autograd (and, for the native operators, fake kernels) shared by every fused backend.

The fused co-training operator computes dloss/dlogits during its forward pass and returns
it as its last output; backward only scales that tensor by grad_output (no second pass
over the logits). Only the loss is differentiable (w.r.t. the logits and the weight);
ce, cot, ensemble and correct are returned detached by divco.ops.cotrain_loss.
Double backward is not supported: the saved gradient is a constant to autograd.

The ensemble operators differentiate through their own backward operator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schema import op_name, qualified_name

# -- cotrain_loss ----------------------------------------------------------------------------


def _cotrain_setup_context(ctx, inputs, output) -> None:
    logits, target, weight, kind, temperature, compute_grad = inputs
    loss, ce, cot, ensemble, correct, grad = output
    ctx.compute_grad = compute_grad
    ctx.save_for_backward(grad, cot)


def _cotrain_backward(ctx, grad_loss, grad_ce, grad_cot, grad_ensemble, grad_correct, grad_grad):
    grad, cot = ctx.saved_tensors
    grad_logits = grad_weight = None
    if ctx.needs_input_grad[0]:
        if not ctx.compute_grad:
            raise RuntimeError(
                "cotrain_loss was called with compute_grad=False, so it stored no gradient; "
                "call divco.ops.cotrain_loss with grad mode enabled to differentiate it"
            )
        grad_logits = grad * (grad_loss if grad_loss.dtype == grad.dtype else grad_loss.to(grad.dtype))
    if ctx.needs_input_grad[2]:
        grad_weight = grad_loss * cot
    return grad_logits, None, grad_weight, None, None, None


def _cotrain_fake(logits: Tensor, target: Tensor, weight: Tensor, kind: str, temperature: float, compute_grad: bool):
    N, S, K = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        logits.new_empty((), **f32),
        logits.new_empty((S,), **f32),
        logits.new_empty((), **f32),
        logits.new_empty((N, K)),
        logits.new_empty((S + 1,), dtype=torch.int64),
        logits.new_empty((N, S, K) if compute_grad else (0,)),
    )


# -- ensemble --------------------------------------------------------------------------------


def _ensemble_setup_context(ctx, inputs, output) -> None:
    logits, mode = inputs
    ctx.mode = mode
    ctx.save_for_backward(logits)


def _ensemble_backward_for(backend: str):
    backward_op = getattr(torch.ops.divco, op_name("ensemble_backward", backend))

    def backward(ctx, grad_out):
        (logits,) = ctx.saved_tensors
        return backward_op(grad_out, logits, ctx.mode), None

    return backward


def _ensemble_fake(logits: Tensor, mode: str) -> Tensor:
    N, S, K = logits.shape
    return logits.new_empty((N, K))


def _ensemble_backward_fake(grad_out: Tensor, logits: Tensor, mode: str) -> Tensor:
    return logits.new_empty(logits.shape)


# -- registration ----------------------------------------------------------------------------

_registered: set[str] = set()


def register(backend: str, *, fakes: bool) -> None:
    """Register autograd for ``divco::*_<backend>`` (and fake kernels when ``fakes``; triton_op
    operators already have theirs). Idempotent."""
    if backend in _registered:
        return
    cotrain = qualified_name("cotrain_loss", backend)
    ensemble = qualified_name("ensemble", backend)
    ensemble_backward = qualified_name("ensemble_backward", backend)
    if fakes:
        torch.library.register_fake(cotrain, _cotrain_fake)
        torch.library.register_fake(ensemble, _ensemble_fake)
        torch.library.register_fake(ensemble_backward, _ensemble_backward_fake)
    torch.library.register_autograd(cotrain, _cotrain_backward, setup_context=_cotrain_setup_context)
    torch.library.register_autograd(
        ensemble, _ensemble_backward_for(backend), setup_context=_ensemble_setup_context
    )
    _registered.add(backend)
