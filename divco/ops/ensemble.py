"""The branch ensembles: public function, operator schemas, fakes, autograd, Triton launchers.

    probs = divco.ops.ensemble(logits, "mean_probs")                      # [N, S, K] -> [N, K]
    probs = divco.ops.ensemble(logits, "mean_probs", weights=[0.5, 0.3, 0.2])

Operators (both backends): ``divco::ensemble_<suffix>(logits, mode, weights) -> [N, K]`` in the
logits dtype, differentiated through ``divco::ensemble_backward_<suffix>(grad_out, logits,
mode, weights) -> [N, S, K]`` (contiguous, logits dtype). Modes: divco.vocabulary.ENSEMBLE_MODES.
``weights`` is None or a float32 tensor [S] on the logits' device, normalised by the operator
(w_s / Σ_t w_t, on the device); the operators are not differentiable w.r.t. it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import backends, reference, registration, triton_backend
from .schema import declare, op_name, operator
from .validation import check_ensemble_weights, check_logits, check_mode, check_weights_tensor

SCHEMA = declare("ensemble", "(Tensor logits, str mode, Tensor? weights) -> Tensor")
BACKWARD_SCHEMA = declare(
    "ensemble_backward", "(Tensor grad_out, Tensor logits, str mode, Tensor? weights) -> Tensor"
)


def ensemble(
    logits: Tensor,
    mode: str = "mean_logits",
    weights: Tensor | Sequence[float] | None = None,
    backend: str | None = None,
) -> Tensor:
    """Combine branch outputs [N, S, K] into one prediction [N, K].

    ``mode`` (divco.vocabulary.ENSEMBLE_MODES), with w_s the normalised weights (1/S without):
    "mean_logits" (default, Σ_s w_s z_s), "mean_probs" (Σ_s w_s softmax(z_s)), "geo_mean"
    (softmax(Σ_s w_s log softmax(z_s)), the weighted normalised geometric mean), "max" (max over
    branches of the logits), "max_probs" (max over branches of the softmaxes, the official
    code's, not renormalised) or "vote" (Σ_s w_s [argmax z_s = k]: the shares of SAMME's weighted
    majority vote, a distribution; a branch's top-1 follows torch.argmax, NaN first, then the
    first maximum; gradient exactly zero). The max modes follow torch.max: a NaN is the maximum,
    and the gradient goes to the first branch holding NaN, else to the first maximal branch.

    ``weights``: None (equal) or per-branch weights [S], a sequence of numbers or a floating
    tensor on the logits' device; finite, >= 0, with a positive sum (checked for numbers and
    CPU tensors; a CUDA tensor is not read, so there is no host synchronisation, but numbers
    are copied to the device, which waits for it). The op normalises them to sum 1 on the
    device. A branch of weight 0 takes no part (its ±inf / NaN logits too). The max modes take
    no weights. The fused backends do not differentiate the weights: weights that require grad
    (with grad mode on) need backend="torch". ``backend`` as in :func:`divco.ops.cotrain_loss`.
    """
    check_logits(logits)
    mode = check_mode(mode)
    weights = check_ensemble_weights(weights, logits, mode)
    backend = backends.resolve_backend(backend, logits.device, logits.dtype)
    if backend == "torch":
        return reference.ensemble(logits, mode, weights)
    if weights is not None:
        if weights.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"divco.ops.ensemble with backend={backend!r} does not differentiate the weights, and these "
                "require grad; use backend='torch' to learn them (or pass weights.detach())"
            )
        if weights.dtype != torch.float32:  # the kernels read float32: scale first so it cannot overflow
            weights = (weights / weights.amax()).to(torch.float32)
    return operator("ensemble", backend)(logits, mode, weights)


# -- fakes and autograd of the operators ---------------------------------------------------


def _fake(logits: Tensor, mode: str, weights: Optional[Tensor]) -> Tensor:
    N, S, K = logits.shape
    return logits.new_empty((N, K))


def _backward_fake(grad_out: Tensor, logits: Tensor, mode: str, weights: Optional[Tensor]) -> Tensor:
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, mode, weights = inputs
    ctx.mode = mode
    ctx.save_for_backward(logits, weights)


def _backward_for(suffix: str):
    def backward(ctx, grad_out):
        logits, weights = ctx.saved_tensors
        registration.refuse_double_backward("ensemble", suffix, logits.device)
        backward_op = getattr(torch.ops.divco, op_name("ensemble_backward", suffix))
        return backward_op(grad_out, logits, ctx.mode, weights), None, None

    return backward


# -- the Triton launchers ------------------------------------------------------------------


def check_operator_weights(weights: Optional[Tensor], logits: Tensor, mode: str) -> None:
    """What an operator called directly (torch.ops.divco.ensemble_*) takes as weights: None, or
    float32 [S] on the logits' device, for a mode that takes weights (metadata only: no sync)."""
    if weights is None:
        return
    check_weights_tensor(weights, logits, mode)
    if weights.dtype != torch.float32:
        raise ValueError(f"the ensemble operators take float32 weights, got {weights.dtype}")


if not triton_backend.TRITON_ERROR:
    from ..kernels.ensemble import MODE_IDS, NORMALISED_MODES, ensemble_backward_kernel, ensemble_kernel

    def _weights_pointer(weights: Optional[Tensor], logits: Tensor) -> Tensor:
        """The weights as the kernels read them (contiguous: they index w_s as weights_ptr + s), or a
        float32 placeholder the kernel never reads (HAS_WEIGHTS false)."""
        return weights.contiguous() if weights is not None else logits.new_empty((1,), dtype=torch.float32)

    def _launch_options(mode: str, weights: Optional[Tensor], S: int, K: int) -> dict:
        """The constexprs and warps both ensemble kernels launch with (one tiling for the pair)."""
        block_s, block_k, num_warps = triton_backend.tile_shape(S, K)
        return dict(MODE=MODE_IDS[mode], NORMALISED=mode in NORMALISED_MODES, HAS_WEIGHTS=weights is not None,
                    BLOCK_S=block_s, BLOCK_K=block_k, num_warps=num_warps)

    @triton_backend.define("ensemble")
    def ensemble_triton(logits: Tensor, mode: str, weights: Optional[Tensor]) -> Tensor:
        triton_backend.check_operands(logits)
        check_mode(mode)
        check_operator_weights(weights, logits, mode)
        N, S, K = logits.shape
        out = torch.empty((N, K), dtype=logits.dtype, device=logits.device)
        with triton_backend.device_guard(logits.device), triton_backend.quiet_interpreter():
            triton_backend.wrap_triton(ensemble_kernel)[(N,)](
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                _weights_pointer(weights, logits),
                out, S, K,
                **_launch_options(mode, weights, S, K),
            )
        return out

    @triton_backend.define("ensemble_backward")
    def ensemble_backward_triton(grad_out: Tensor, logits: Tensor, mode: str, weights: Optional[Tensor]) -> Tensor:
        triton_backend.check_operands(logits)
        check_mode(mode)
        check_operator_weights(weights, logits, mode)
        N, S, K = logits.shape
        grad_out = grad_out.contiguous()
        grad = torch.empty((N, S, K), dtype=logits.dtype, device=logits.device)
        with triton_backend.device_guard(logits.device), triton_backend.quiet_interpreter():
            triton_backend.wrap_triton(ensemble_backward_kernel)[(N,)](
                grad_out,
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                _weights_pointer(weights, logits),
                grad, S, K,
                **_launch_options(mode, weights, S, K),
            )
        return grad


for _suffix in registration.defined_suffixes():
    registration.register("ensemble_backward", _suffix, fake=_backward_fake)
    registration.register(
        "ensemble", _suffix, fake=_fake, backward=_backward_for(_suffix), setup_context=_setup_context
    )
