"""The fused co-training loss: public function, operator schema, fake, autograd, Triton launcher.

    out = divco.ops.cotrain_loss(logits, target, weight=0.5)   # logits [N, S, K]

The operator ``divco::cotrain_loss_<native|triton>`` computes dloss/dlogits during its
forward pass and returns it as its last output; backward only scales that tensor by
grad_output (no second pass over the logits). Only the loss is differentiable (w.r.t. the
logits and the weight); ce, cot, ensemble and correct are returned detached.

Operator contract (both backends):
    logits       [N, S, K] float32 / bfloat16 / float16, any strides
    target       int64 [N] class indices, or floating [N, K] soft targets
    weight       0-dim float32 on the logits' device: the co-training weight, read by the
                 kernel (so a warm-up schedule changes no graph and needs no host sync)
    sample_weight  None, or float32 [N] on the logits' device: per-sample weights v_n that
                 scale row n's cross-entropies, co-training term and gradient (not
                 differentiated)
    kind         "js" | "kl"
    temperature  > 0 (co-training term only; the cross-entropy uses no temperature)
    compute_grad write dloss/dlogits (for grad_output = 1) during the forward pass
  -> loss     0-dim float32        sum_s CE_s + weight * J
     ce       [S] float32          CE_s, mean over the batch (of v_n * CE_ns with sample_weight)
     cot      0-dim float32        J, the co-training term (unweighted by `weight`;
                                   mean of v_n * J_n with sample_weight)
     ensemble [N, K] logits dtype  mean of the branch logits
     correct  [S+1] int64          top-1 hits per branch, then of the ensemble
     grad     [N, S, K] contiguous, or shape [0] when compute_grad is false; the logits dtype,
              float32 for float16 logits (see stored_grad_dtype)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, reference, registration, triton_backend
from .schema import CotrainLoss, declare, operator
from .validation import (
    check_kind,
    check_logits,
    check_sample_weight,
    check_target,
    check_temperature,
    check_weight,
)

SCHEMA = declare(
    "cotrain_loss",
    "(Tensor logits, Tensor target, Tensor weight, Tensor? sample_weight, str kind, float temperature,"
    " bool compute_grad)"
    " -> (Tensor loss, Tensor ce, Tensor cot, Tensor ensemble, Tensor correct, Tensor grad)",
)


def cotrain_loss(
    logits: Tensor,
    target: Tensor,
    *,
    weight: float | Tensor = 0.5,
    kind: str = "js",
    temperature: float = 1.0,
    sample_weight: Tensor | None = None,
    backend: str | None = None,
) -> CotrainLoss:
    """The Divide-and-Co-training objective of S branches, fused into one pass over the logits.

    ``logits`` [N, S, K] (any strides; float32, bfloat16 or float16, float64 with the torch
    backend); ``target`` class indices [N] (int64) or soft targets [N, K] (mixup, label
    smoothing). With p_s = softmax(z_s / temperature):

        loss = Σ_s CE_s + weight · J
        CE_s = mean_n -Σ_k y_nk log softmax(z_ns)_k         (no temperature)
        J ("js") = mean_n [ H(p̄_n) - (1/S) Σ_s H(p_ns) ]     (p̄ = mean_s p_s; the paper's)
        J ("kl") = 1/(S-1) mean_n Σ_s Σ_{t≠s} KL(stopgrad(p_nt) || p_ns)

    Returns ``CotrainLoss(loss, ce, cot, ensemble, correct)``: ``loss`` differentiable 0-dim
    float32 (float64 for float64 logits); ``ce`` [S] and ``cot`` detached; ``ensemble`` [N, K]
    the detached mean of the logits; ``correct`` [S+1] int64 top-1 hits per branch and (last)
    of the ensemble (soft targets count against their argmax).

    ``sample_weight`` (None or a floating tensor [N] on the logits' device, entries finite and
    >= 0): per-sample weights v_n. Every mean over the batch above becomes mean_n v_n · (...)_n,
    so ``ce`` and ``cot`` are the weighted terms and row n's gradient is scaled by v_n;
    ``correct`` and ``ensemble`` do not change. The op does not normalise the weights (give
    them mean 1 over the data set, as boosting does; within a batch the mean may differ from
    1). The fused backends compute in float32 and do not differentiate the weights (a
    sample_weight that requires grad is a ValueError there); backend="torch" does.
    Entries are checked for CPU tensors only (reading a CUDA tensor would synchronise).

    ``weight`` may be a 0-dim tensor on the logits' device: the kernels read it from memory,
    so a warm-up schedule changes neither a compiled graph nor a captured CUDA graph.
    ``backend``: "torch", "triton", "cpu", "cuda" or None (DIVCO_BACKEND, else the fastest
    available; see divco.ops.backends). The fused backends compute dloss/dlogits in the
    forward pass when the logits require grad; nothing synchronises with the host.

    Class indices outside [0, K): ValueError on CPU tensors (eager mode); on CUDA the loss
    of such samples is NaN unless DIVCO_CHECK_TARGETS=1 asks for the (synchronising) check.

    ``weight`` must be finite (checked for numbers and CPU tensors; a CUDA tensor is not read,
    which would synchronise); negative weights are allowed. A -inf logit has probability 0 and
    adds nothing (see divco.ops.reference for the edge values). Higher-order gradients need
    backend="torch": the fused backends raise a RuntimeError under create_graph=True.
    """
    check_logits(logits)
    target = check_target(target, logits)
    weight = check_weight(weight, logits)
    kind = check_kind(kind)
    temperature = check_temperature(temperature)
    sample_weight = check_sample_weight(sample_weight, logits)
    backend = backends.resolve_backend(backend, logits.device, logits.dtype)
    if backend == "torch":
        return reference.cotrain_loss(logits, target, weight, kind, temperature, sample_weight)
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"backend {backend!r} does not differentiate the soft targets, which require grad; "
            "detach them or use backend='torch'"
        )
    if sample_weight is not None:
        if sample_weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"backend {backend!r} does not differentiate sample_weight, which requires grad; "
                "detach it or use backend='torch'"
            )
        if sample_weight.dtype != torch.float32:
            sample_weight = sample_weight.to(torch.float32)  # what the kernels read
    if isinstance(weight, Tensor):
        # Tensor.to costs microseconds even when it returns self: skip it where it would.
        weight_tensor = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
    else:
        # A fill, not a host-to-device copy: allowed inside CUDA-graph capture.
        weight_tensor = torch.full((), weight, dtype=torch.float32, device=logits.device)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, ce, cot, ensemble, correct, _ = operator("cotrain_loss", backend)(
        logits, target, weight_tensor, sample_weight, kind, temperature, compute_grad
    )
    # ce, cot and ensemble need no detach(): the autograd marks them non-differentiable.
    return CotrainLoss(loss, ce, cot, ensemble, correct)


# -- fake and autograd of the operators ----------------------------------------------------


def stored_grad_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradient the operators (native and Triton alike) return: float32 for float16
    logits, since a 1/N-sized gradient underflows float16 before a GradScaler multiplies it."""
    return torch.float32 if logits_dtype == torch.float16 else logits_dtype


def _fake(
    logits: Tensor,
    target: Tensor,
    weight: Tensor,
    sample_weight: Optional[Tensor],
    kind: str,
    temperature: float,
    compute_grad: bool,
):
    N, S, K = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        logits.new_empty((), **f32),
        logits.new_empty((S,), **f32),
        logits.new_empty((), **f32),
        logits.new_empty((N, K)),
        logits.new_empty((S + 1,), dtype=torch.int64),
        logits.new_empty((N, S, K) if compute_grad else (0,), dtype=stored_grad_dtype(logits.dtype)),
    )


def _setup_context(ctx, inputs, output) -> None:
    logits, target, weight, sample_weight, kind, temperature, compute_grad = inputs
    loss, ce, cot, ensemble, correct, grad = output
    # Only the loss is differentiable: autograd then passes None (no zeros materialised per
    # backward) for the other outputs' gradients, which nobody reads.
    ctx.mark_non_differentiable(ce, cot, ensemble, correct, grad)
    ctx.set_materialize_grads(False)
    ctx.compute_grad = compute_grad
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(grad, cot)


def _backward_for(suffix: str):
    def backward(ctx, grad_loss, grad_ce, grad_cot, grad_ensemble, grad_correct, grad_grad):
        grad, cot = ctx.saved_tensors
        registration.refuse_double_backward("cotrain_loss", suffix, grad.device)
        grad_logits = grad_weight = None
        if grad_loss is None:  # not materialised: the loss takes no part in what is differentiated
            return None, None, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            if not ctx.compute_grad:
                raise RuntimeError(
                    "cotrain_loss was called with compute_grad=False, so it stored no gradient; "
                    "call divco.ops.cotrain_loss with grad mode enabled to differentiate it"
                )
            # Multiply in float32 and cast last: a GradScaler's grad_loss (65536) overflows
            # float16, and a small stored gradient would flush to zero in float16 before the scale.
            # (Tensor.to costs microseconds even when it returns self: skipped where it would.)
            if grad.dtype == torch.float32 and grad_loss.dtype == torch.float32:
                grad_logits = grad * grad_loss
            else:
                grad_logits = grad.to(torch.float32) * grad_loss.to(torch.float32)
            if grad_logits.dtype != ctx.logits_dtype:
                grad_logits = grad_logits.to(ctx.logits_dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = grad_loss * cot
        if ctx.needs_input_grad[3]:  # reachable only by calling the operator directly
            raise RuntimeError(
                f"divco::cotrain_loss_{suffix} does not differentiate sample_weight; "
                "use divco.ops.cotrain_loss(..., backend='torch') for its gradient"
            )
        return grad_logits, None, grad_weight, None, None, None, None

    return backward


# -- the Triton launcher -------------------------------------------------------------------


def check_sample_weight_operand(sample_weight: Tensor, rows: int, device: torch.device) -> None:
    """What the kernels read (the operators can be called directly): float32 [N] on the logits' device."""
    if sample_weight.dtype != torch.float32 or tuple(sample_weight.shape) != (rows,) or sample_weight.device != device:
        raise ValueError(
            f"sample_weight must be a float32 tensor of shape [N] = [{rows}] on {device}, got "
            f"{sample_weight.dtype} of shape {tuple(sample_weight.shape)} on {sample_weight.device}"
        )


if not triton_backend.TRITON_ERROR:
    from ..kernels.cotrain_loss import cotrain_loss_kernel

    @triton_backend.define("cotrain_loss")
    def cotrain_loss_triton(
        logits: Tensor,
        target: Tensor,
        weight: Tensor,
        sample_weight: Optional[Tensor],  # Optional[...]: what infer_schema reads on every torch
        kind: str,
        temperature: float,
        compute_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        triton_backend.check_operands(logits)
        check_kind(kind)
        N, S, K = logits.shape
        device = logits.device
        soft = target.is_floating_point()
        ensemble = torch.empty((N, K), dtype=logits.dtype, device=device)
        grad_shape = (N, S, K) if compute_grad else (0,)  # its own buffer, never written when empty
        grad = torch.empty(grad_shape, dtype=stored_grad_dtype(logits.dtype), device=device)
        ce_rows = torch.empty((N, S), dtype=torch.float32, device=device)
        cot_rows = torch.empty((N,), dtype=torch.float32, device=device)
        hits = torch.empty((N, S + 1), dtype=torch.int32, device=device)
        block_s, block_k, num_warps = triton_backend.tile_shape(S, K)
        if S == 1:
            cot_coef = 0.0  # one branch has nothing to agree with: J = 0 exactly
        elif kind == "kl":
            cot_coef = S / (S - 1)
        else:
            cot_coef = 1.0 / S
        target_strides = (target.stride(0), target.stride(1)) if soft else (target.stride(0), 0)
        has_sample_weight = sample_weight is not None
        if has_sample_weight:
            check_sample_weight_operand(sample_weight, N, device)
        with triton_backend.device_guard(device), triton_backend.quiet_interpreter():
            triton_backend.wrap_triton(cotrain_loss_kernel)[(N,)](
                logits, logits.stride(0), logits.stride(1), logits.stride(2),
                target, target_strides[0], target_strides[1],
                weight,
                sample_weight if has_sample_weight else weight,  # an unread stand-in without weights
                sample_weight.stride(0) if has_sample_weight else 0,
                ensemble, grad,
                ce_rows, cot_rows, hits,
                N, S, K,
                1.0 / temperature, cot_coef,
                SOFT_TARGET=soft,
                KIND_KL=kind == "kl",
                UNIT_TEMPERATURE=temperature == 1.0,
                COMPUTE_GRAD=compute_grad,
                HAS_SAMPLE_WEIGHT=has_sample_weight,
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


for _suffix in registration.defined_suffixes():
    registration.register(
        "cotrain_loss", _suffix, fake=_fake, backward=_backward_for(_suffix), setup_context=_setup_context
    )
