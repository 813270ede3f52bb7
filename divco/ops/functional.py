"""The public functions: cotrain_loss and ensemble, dispatched to a backend."""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, fused, reference, triton_backend
from .reference import CotrainLoss
from .schema import op_name
from .validation import check_kind, check_logits, check_mode, check_target, check_temperature, check_weight

# backends loaded divco._C (its TORCH_LIBRARY(divco, m) defines the namespace) before the
# Triton backend added its divco:: operators; give them fakes and autograd.
if backends.native_status()[0]:
    fused.register("native", fakes=True)

if not triton_backend.TRITON_ERROR:
    # triton_op operators trace their launcher as the fake; the interpreted ones need fakes.
    fused.register("triton", fakes=triton_backend.KERNELS_INTERPRETED, grad_dtype=triton_backend.stored_grad_dtype)


def _op(base: str, backend: str):
    """torch.ops.divco.<base>_<triton|native>: the "cpu" and "cuda" backends share the native op."""
    return getattr(torch.ops.divco, op_name(base, "triton" if backend == "triton" else "native"))


def cotrain_loss(
    logits: Tensor,
    target: Tensor,
    *,
    weight: float | Tensor = 0.5,
    kind: str = "js",
    temperature: float = 1.0,
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
    backend = backends.resolve_backend(backend, logits.device, logits.dtype)
    if backend == "torch":
        return reference.cotrain_loss(logits, target, weight, kind, temperature)
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"backend {backend!r} does not differentiate the soft targets, which require grad; "
            "detach them or use backend='torch'"
        )
    if isinstance(weight, Tensor):
        # Tensor.to costs microseconds even when it returns self: skip it where it would.
        weight_tensor = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
    else:
        # A fill, not a host-to-device copy: allowed inside CUDA-graph capture.
        weight_tensor = torch.full((), weight, dtype=torch.float32, device=logits.device)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, ce, cot, ensemble, correct, _ = _op("cotrain_loss", backend)(
        logits, target, weight_tensor, kind, temperature, compute_grad
    )
    return CotrainLoss(loss, ce.detach(), cot.detach(), ensemble.detach(), correct)


def ensemble(logits: Tensor, mode: str = "mean_logits", backend: str | None = None) -> Tensor:
    """Combine branch outputs [N, S, K] into one prediction [N, K].

    ``mode`` (divco.vocabulary.ENSEMBLE_MODES): "mean_logits" (default), "mean_probs" (mean
    of the softmaxes), "geo_mean" (softmax of the mean log-probabilities), "max" (max over
    branches of the logits) or "max_probs" (max over branches of the softmaxes, the official
    code's, not renormalised). Differentiable; the max modes follow torch.max: a NaN is the
    maximum, and the gradient goes to the first branch holding NaN, else to the first maximal
    branch. ``backend`` as in :func:`cotrain_loss`.
    """
    check_logits(logits)
    mode = check_mode(mode)
    backend = backends.resolve_backend(backend, logits.device, logits.dtype)
    if backend == "torch":
        return reference.ensemble(logits, mode)
    return _op("ensemble", backend)(logits, mode)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable for tensors on ``device``; the first is the default for float32."""
    return backends.available_backends(device)
