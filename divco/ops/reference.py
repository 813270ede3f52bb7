"""The readable reference of the co-training objective and the ensembles, in plain PyTorch.

Everything else (Triton, C++, CUDA) is judged against these functions evaluated in float64.
They follow the formulas literally and leave gradients to autograd; the only liberty taken
is computing log(mean_s p_s) as a logsumexp, so that probabilities that underflow (logits of
±1e4) give 0 · finite instead of 0 · log 0 = NaN.

Notation: logits z [N, S, K]; p_s = softmax(z_s / T); p̄ = (1/S) Σ_s p_s; H the entropy.

    CE_s = mean_n ( -Σ_k y_nk · log softmax(z_ns)_k )          (no temperature)
    "js":  J = mean_n [ H(p̄_n) - (1/S) Σ_s H(p_ns) ]            (gradient through p̄ too)
    "kl":  J = 1/(S-1) · mean_n Σ_s Σ_{t≠s} KL( stopgrad(p_nt) || p_ns )
    loss = Σ_s CE_s + w · J                                       (S = 1: J = 0)

Computation happens in float64 for float64 logits and in float32 otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class CotrainLoss(NamedTuple):
    """What :func:`divco.ops.cotrain_loss` returns.

    loss      differentiable 0-dim: Σ_s CE_s + weight · J
    ce        [S] detached: each branch's cross-entropy, mean over the batch
    cot       0-dim detached: the co-training term J (before the weight)
    ensemble  [N, K] detached: mean of the branch logits
    correct   [S+1] int64: top-1 hits of each branch, then of the ensemble
    """

    loss: Tensor
    ce: Tensor
    cot: Tensor
    ensemble: Tensor
    correct: Tensor


def compute_dtype(logits: Tensor) -> torch.dtype:
    """float64 stays float64; float32 / bfloat16 / float16 accumulate in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# -- building blocks ------------------------------------------------------------------------


def entropy(log_p: Tensor) -> Tensor:
    """H(p) = -Σ_k p_k log p_k over the last dim, from log-probabilities."""
    return -(log_p.exp() * log_p).sum(-1)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = Σ_k p_k (log p_k - log q_k) over the last dim, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def log_mean_probability(log_p: Tensor) -> Tensor:
    """log p̄ = log( (1/S) Σ_s p_s ) for log_p [N, S, K] -> [N, K]."""
    return torch.logsumexp(log_p, dim=1) - math.log(log_p.shape[1])


def target_labels(target: Tensor) -> Tensor:
    """Class indices [N]: the target itself, or the argmax of soft targets (first max on ties)."""
    return target if not target.is_floating_point() else target.argmax(-1)


def cross_entropy_per_branch(logits: Tensor, target: Tensor) -> Tensor:
    """CE_s = mean_n ( -Σ_k y_nk log softmax(z_ns)_k ) -> [S].

    Hard targets pick the target class's log-probability (one-hot y). A class index
    outside [0, K) makes that sample's cross-entropy NaN (and so the loss).
    """
    log_q = F.log_softmax(logits, dim=-1)  # [N, S, K], no temperature in the CE
    if target.is_floating_point():
        y = target.to(log_q.dtype)[:, None, :]  # [N, 1, K], shared by every branch
        per_sample = -(y * log_q).sum(-1)  # [N, S]
    else:
        K = logits.shape[-1]
        valid = (target >= 0) & (target < K)
        index = target.clamp(0, K - 1)[:, None, None].expand(-1, logits.shape[1], 1)
        per_sample = -log_q.gather(-1, index).squeeze(-1)  # [N, S]
        nan_if_invalid = torch.where(valid, 1.0, math.nan).to(per_sample.dtype)
        per_sample = per_sample * nan_if_invalid[:, None]
    return per_sample.mean(0)


def js_divergence(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """J = mean_n [ H(p̄_n) - (1/S) Σ_s H(p_ns) ], p_s = softmax(z_s / T)."""
    log_p = F.log_softmax(logits / temperature, dim=-1)  # [N, S, K]
    entropy_of_mean = entropy(log_mean_probability(log_p))  # [N]
    mean_of_entropies = entropy(log_p).mean(1)  # [N]
    return (entropy_of_mean - mean_of_entropies).mean()


def pairwise_kl(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """J = 1/(S-1) · mean_n Σ_s Σ_{t≠s} KL( stopgrad(p_nt) || p_ns ); 0 for S = 1."""
    S = logits.shape[1]
    log_p = F.log_softmax(logits / temperature, dim=-1)  # [N, S, K]
    if S == 1:
        return (log_p * 0).sum() / logits.shape[0]  # zero, still connected to the graph
    total = log_p.new_zeros(logits.shape[0])
    for t in range(S):
        teacher = log_p[:, t : t + 1].detach()  # [N, 1, K]: p_t is a fixed target
        kl_to_every_branch = kl_divergence(teacher, log_p)  # [N, S]: KL(p_t || p_s) for every s
        total = total + kl_to_every_branch.sum(1) - kl_to_every_branch[:, t]
    return (total / (S - 1)).mean()


def cotraining_term(logits: Tensor, kind: str = "js", temperature: float = 1.0) -> Tensor:
    """The co-training term J of the given kind ("js" or "kl")."""
    if kind == "js":
        return js_divergence(logits, temperature)
    if kind == "kl":
        return pairwise_kl(logits, temperature)
    raise ValueError(f"kind must be 'js' or 'kl', got {kind!r}")


def correct_counts(logits: Tensor, target: Tensor) -> Tensor:
    """[S+1] int64: top-1 hits of every branch, then of the mean-of-logits ensemble."""
    labels = target_labels(target)  # [N]
    branch_hits = (logits.argmax(-1) == labels[:, None]).sum(0)  # [S]
    ensemble_hits = (logits.mean(1).argmax(-1) == labels).sum()[None]  # [1]
    return torch.cat([branch_hits, ensemble_hits]).to(torch.int64)


# -- the objective and the ensembles --------------------------------------------------------


def cotrain_loss(
    logits: Tensor,
    target: Tensor,
    weight: float | Tensor = 0.5,
    kind: str = "js",
    temperature: float = 1.0,
) -> CotrainLoss:
    """loss = Σ_s CE_s + weight · J, plus the per-branch CE, J, the ensemble and hit counts.

    No input checks here (see :mod:`divco.ops.validation`); gradients come from autograd.
    """
    z = logits.to(compute_dtype(logits))
    ce = cross_entropy_per_branch(z, target)
    cot = cotraining_term(z, kind, temperature)
    if isinstance(weight, Tensor):
        weight = weight.to(z.dtype)
    loss = ce.sum() + weight * cot
    with torch.no_grad():
        ensemble = logits.detach().to(z.dtype).mean(1).to(logits.dtype)
        correct = correct_counts(z.detach(), target)
    return CotrainLoss(loss, ce.detach(), cot.detach(), ensemble, correct)


def ensemble(logits: Tensor, mode: str = "mean_logits") -> Tensor:
    """Combine branch outputs [N, S, K] into [N, K].

    mean_logits  (1/S) Σ_s z_s
    mean_probs   (1/S) Σ_s softmax(z_s)
    geo_mean     softmax( (1/S) Σ_s log softmax(z_s) )  (normalised geometric mean)
    max          max_s z_s (the gradient goes to the first maximal branch, like torch.max)
    """
    z = logits.to(compute_dtype(logits))
    if mode == "mean_logits":
        out = z.mean(1)
    elif mode == "mean_probs":
        out = F.softmax(z, dim=-1).mean(1)
    elif mode == "geo_mean":
        out = F.softmax(F.log_softmax(z, dim=-1).mean(1), dim=-1)
    elif mode == "max":
        out = z.max(dim=1).values
    else:
        raise ValueError(f"mode must be one of mean_logits, mean_probs, geo_mean, max; got {mode!r}")
    return out.to(logits.dtype)


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    residual: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """act(batch_norm(x) + residual) as eager PyTorch ops (the fused BatchNorm's reference;
    exact in float64). Running statistics are updated in place by F.batch_norm."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if activation == "relu":
        y = torch.relu(y)
    return y
