"""The branch ensembles: public function, operator schemas, fakes, autograd, Triton launchers.

    probs = divco.ops.ensemble(logits, "mean_probs")   # [N, S, K] -> [N, K]

Operators (both backends): ``divco::ensemble_<suffix>(logits, mode) -> [N, K]`` in the logits
dtype, differentiated through ``divco::ensemble_backward_<suffix>(grad_out, logits, mode)
-> [N, S, K]`` (contiguous, logits dtype). Modes: divco.vocabulary.ENSEMBLE_MODES.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, reference, registration, triton_backend
from .schema import declare, op_name, operator
from .validation import check_logits, check_mode

SCHEMA = declare("ensemble", "(Tensor logits, str mode) -> Tensor")
BACKWARD_SCHEMA = declare("ensemble_backward", "(Tensor grad_out, Tensor logits, str mode) -> Tensor")


def ensemble(logits: Tensor, mode: str = "mean_logits", backend: str | None = None) -> Tensor:
    """Combine branch outputs [N, S, K] into one prediction [N, K].

    ``mode`` (divco.vocabulary.ENSEMBLE_MODES): "mean_logits" (default), "mean_probs" (mean
    of the softmaxes), "geo_mean" (softmax of the mean log-probabilities), "max" (max over
    branches of the logits) or "max_probs" (max over branches of the softmaxes, the official
    code's, not renormalised). Differentiable; the max modes follow torch.max: a NaN is the
    maximum, and the gradient goes to the first branch holding NaN, else to the first maximal
    branch. ``backend`` as in :func:`divco.ops.cotrain_loss`.
    """
    check_logits(logits)
    mode = check_mode(mode)
    backend = backends.resolve_backend(backend, logits.device, logits.dtype)
    if backend == "torch":
        return reference.ensemble(logits, mode)
    return operator("ensemble", backend)(logits, mode)


# -- fakes and autograd of the operators ---------------------------------------------------


def _fake(logits: Tensor, mode: str) -> Tensor:
    N, S, K = logits.shape
    return logits.new_empty((N, K))


def _backward_fake(grad_out: Tensor, logits: Tensor, mode: str) -> Tensor:
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, mode = inputs
    ctx.mode = mode
    ctx.save_for_backward(logits)


def _backward_for(suffix: str):
    def backward(ctx, grad_out):
        (logits,) = ctx.saved_tensors
        registration.refuse_double_backward("ensemble", suffix, logits.device)
        backward_op = getattr(torch.ops.divco, op_name("ensemble_backward", suffix))
        return backward_op(grad_out, logits, ctx.mode), None

    return backward


# -- the Triton launchers ------------------------------------------------------------------

if not triton_backend.TRITON_ERROR:
    from ..kernels.ensemble import MODE_IDS, NORMALISED_MODES, ensemble_backward_kernel, ensemble_kernel

    @triton_backend.define("ensemble")
    def ensemble_triton(logits: Tensor, mode: str) -> Tensor:
        triton_backend.check_operands(logits)
        check_mode(mode)
        N, S, K = logits.shape
        out = torch.empty((N, K), dtype=logits.dtype, device=logits.device)
        block_s, block_k, num_warps = triton_backend.tile_shape(S, K)
        with triton_backend.device_guard(logits.device), triton_backend.quiet_interpreter():
            triton_backend.wrap_triton(ensemble_kernel)[(N,)](
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                out, S, K,
                MODE=MODE_IDS[mode],
                NORMALISED=mode in NORMALISED_MODES,
                BLOCK_S=block_s,
                BLOCK_K=block_k,
                num_warps=num_warps,
            )
        return out

    @triton_backend.define("ensemble_backward")
    def ensemble_backward_triton(grad_out: Tensor, logits: Tensor, mode: str) -> Tensor:
        triton_backend.check_operands(logits)
        check_mode(mode)
        N, S, K = logits.shape
        grad_out = grad_out.contiguous()
        grad = torch.empty((N, S, K), dtype=logits.dtype, device=logits.device)
        block_s, block_k, num_warps = triton_backend.tile_shape(S, K)
        with triton_backend.device_guard(logits.device), triton_backend.quiet_interpreter():
            triton_backend.wrap_triton(ensemble_backward_kernel)[(N,)](
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


for _suffix in registration.defined_suffixes():
    registration.register("ensemble_backward", _suffix, fake=_backward_fake)
    registration.register(
        "ensemble", _suffix, fake=_fake, backward=_backward_for(_suffix), setup_context=_setup_context
    )
