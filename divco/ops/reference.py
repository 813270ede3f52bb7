"""The readable reference of the co-training objective and the ensembles, in plain PyTorch.

Everything else (Triton, C++, CUDA) is judged against these functions evaluated in float64.
They follow the formulas literally and leave gradients to autograd; the liberties taken are
numerical: log(mean_s p_s) is a logsumexp (probabilities that underflow at logits of ±1e4 keep
a finite log), the Jensen-Shannon term is written as mean_s KL(p_s || p̄) (equal to
H(p̄) - mean_s H(p_s), without the cancellation), and means over branches divide before
they sum (Σ_s z_s / S cannot overflow near ±3e38 when the mean fits).

Edge values, the same on every backend: a -inf logit has probability exactly 0 and
p · log p := 0 where p = 0, so it adds 0 to every entropy and KL term and gets no gradient
from them (also where it is masked in one branch only: "kl" drops the student's masked
terms, see pairwise_kl). A branch whose logits are all -inf is undefined: NaN. NaN in gives
NaN out.

Notation: logits z [N, S, K]; p_s = softmax(z_s / T); p̄ = (1/S) Σ_s p_s; H the entropy.

    CE_s = mean_n ( -Σ_k y_nk · log softmax(z_ns)_k )          (no temperature)
    "js":  J = mean_n [ H(p̄_n) - (1/S) Σ_s H(p_ns) ]            (gradient through p̄ too)
    "kl":  J = 1/(S-1) · mean_n Σ_s Σ_{t≠s} KL( stopgrad(p_nt) || p_ns )   (see pairwise_kl)
    loss = Σ_s CE_s + w · J                                       (S = 1: J = 0)

With per-sample weights v [N] (sample_weight) every mean over the batch becomes
mean_n v_n · (...)_n (not normalised by Σ v: the caller's weights have mean 1 over the data
set); v = 0 keeps the literal product, so a NaN/inf row term stays NaN (0 · inf).

Computation happens in float64 for float64 logits and in float32 otherwise.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor

from ..vocabulary import ENSEMBLE_MODES, WEIGHTED_ENSEMBLE_MODES
from .schema import CotrainLoss


def compute_dtype(logits: Tensor) -> torch.dtype:
    """float64 stays float64; float32 / bfloat16 / float16 accumulate in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# -- building blocks ------------------------------------------------------------------------


def weighted_log(weight: Tensor, log_x: Tensor) -> Tensor:
    """weight · log_x elementwise, := 0 where weight = 0 (also where log_x = -inf there).

    The masked lanes see log_x = 0, so that neither the value nor the gradient is 0 · -inf."""
    zero = weight == 0
    return torch.where(zero, 0.0, weight * torch.where(zero, 0.0, log_x))


def entropy(log_p: Tensor) -> Tensor:
    """H(p) = -Σ_k p_k log p_k over the last dim, from log-probabilities (0 · log 0 := 0)."""
    return -weighted_log(log_p.exp(), log_p).sum(-1)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = Σ_k p_k (log p_k - log q_k) over the last dim, from log-probabilities.

    Terms with p_k = 0 are 0; p_k > 0 = q_k gives +inf."""
    p = log_p.exp()
    return (weighted_log(p, log_p) - weighted_log(p, log_q)).sum(-1)


def log_mean_probability(log_p: Tensor) -> Tensor:
    """log p̄ = log( (1/S) Σ_s p_s ) for log_p [N, S, K] -> [N, K].

    A class that every branch gives probability 0 gets log p̄ = -inf, without the NaN
    gradient logsumexp would have there (exp(-inf - -inf))."""
    dead = (log_p == -math.inf).all(dim=1)  # [N, K]
    safe = torch.where(dead[:, None, :], 0.0, log_p)
    return torch.where(dead, -math.inf, torch.logsumexp(safe, dim=1) - math.log(log_p.shape[1]))


def mean_over_branches(x: Tensor) -> Tensor:
    """(1/S) Σ_s x_s over dim 1, dividing first: no overflow when the mean fits the dtype."""
    return (x / x.shape[1]).sum(1)


def batch_mean(per_sample: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """mean_n x_n over dim 0, or mean_n v_n · x_n with per-sample weights v [N]."""
    if sample_weight is None:
        return per_sample.mean(0)
    v = sample_weight.to(per_sample.dtype)
    return (v.reshape((-1,) + (1,) * (per_sample.dim() - 1)) * per_sample).mean(0)


def target_labels(target: Tensor) -> Tensor:
    """Class indices [N]: the target itself, or the argmax of soft targets (first max on ties)."""
    return target if not target.is_floating_point() else target.argmax(-1)


def cross_entropy_per_branch(logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """CE_s = mean_n v_n ( -Σ_k y_nk log softmax(z_ns)_k ) -> [S] (v_n = 1 without sample_weight).

    Hard targets pick the target class's log-probability (one-hot y). A class index
    outside [0, K) makes that sample's cross-entropy NaN (and so the loss).
    """
    log_q = F.log_softmax(logits, dim=-1)  # [N, S, K], no temperature in the CE
    if target.is_floating_point():
        y = target.to(log_q.dtype)[:, None, :]  # [N, 1, K], shared by every branch
        per_sample = -weighted_log(y.expand_as(log_q), log_q).sum(-1)  # [N, S]; y = 0 terms are 0
    else:
        K = logits.shape[-1]
        valid = (target >= 0) & (target < K)
        index = target.clamp(0, K - 1)[:, None, None].expand(-1, logits.shape[1], 1)
        per_sample = -log_q.gather(-1, index).squeeze(-1)  # [N, S]
        nan_if_invalid = torch.where(valid, 1.0, math.nan).to(per_sample.dtype)
        per_sample = per_sample * nan_if_invalid[:, None]
    return batch_mean(per_sample, sample_weight)


def js_divergence(logits: Tensor, temperature: float = 1.0, sample_weight: Tensor | None = None) -> Tensor:
    """J = mean_n v_n [ H(p̄_n) - (1/S) Σ_s H(p_ns) ] = mean_n v_n (1/S) Σ_s KL(p_ns || p̄_n),
    p_s = softmax(z_s / T) (v_n = 1 without sample_weight)."""
    log_p = F.log_softmax(logits / temperature, dim=-1)  # [N, S, K]
    log_p_bar = log_mean_probability(log_p)[:, None, :]  # [N, 1, K]
    return batch_mean(kl_divergence(log_p, log_p_bar.expand_as(log_p)).mean(1), sample_weight)


def pairwise_kl(logits: Tensor, temperature: float = 1.0, sample_weight: Tensor | None = None) -> Tensor:
    """J = 1/(S-1) · mean_n v_n Σ_s Σ_{t≠s} KL( stopgrad(p_nt) || p_ns ); 0 for S = 1.

    Summed over the teachers t this is S/(S-1) · mean_n Σ_s Σ_k c_sk · log p_sk with
    c_s = stopgrad(p_s - p̄) (the teachers' p_t are constants, so only log p_s is
    differentiated), which is how it is computed: a class masked in branch s (log p_sk = -inf,
    from a -inf logit) then contributes 0 like every other term of a probability-0 class,
    where the pairwise sum would be +inf if another branch gave that class probability > 0.
    """
    S = logits.shape[1]
    log_p = F.log_softmax(logits / temperature, dim=-1)  # [N, S, K]
    if S == 1:
        return (log_p * 0).sum() / logits.shape[0]  # zero, still connected to the graph
    with torch.no_grad():
        p = log_p.exp()
        coefficient = p - p.mean(1, keepdim=True)  # c_s = p_s - p̄, the teachers' side
        coefficient = torch.where(log_p == -math.inf, 0.0, coefficient)  # masked: adds 0
    per_sample = weighted_log(coefficient, log_p).sum((1, 2))  # [N]
    return batch_mean(per_sample * (S / (S - 1)), sample_weight)


def cotraining_term(
    logits: Tensor, kind: str = "js", temperature: float = 1.0, sample_weight: Tensor | None = None
) -> Tensor:
    """The co-training term J of the given kind ("js" or "kl"), optionally sample-weighted."""
    if kind == "js":
        return js_divergence(logits, temperature, sample_weight)
    if kind == "kl":
        return pairwise_kl(logits, temperature, sample_weight)
    raise ValueError(f"kind must be 'js' or 'kl', got {kind!r}")


def correct_counts(logits: Tensor, target: Tensor) -> Tensor:
    """[S+1] int64: top-1 hits of every branch, then of the mean-of-logits ensemble."""
    labels = target_labels(target)  # [N]
    branch_hits = (logits.argmax(-1) == labels[:, None]).sum(0)  # [S]
    ensemble_hits = (mean_over_branches(logits).argmax(-1) == labels).sum()[None]  # [1]
    return torch.cat([branch_hits, ensemble_hits]).to(torch.int64)


# -- the objective and the ensembles --------------------------------------------------------


def cotrain_loss(
    logits: Tensor,
    target: Tensor,
    weight: float | Tensor = 0.5,
    kind: str = "js",
    temperature: float = 1.0,
    sample_weight: Tensor | None = None,
):
    """loss = Σ_s CE_s + weight · J (each a mean_n v_n · (...)_n with sample_weight v), plus the
    per-branch CE, J, the ensemble and hit counts, as the op's :class:`divco.ops.CotrainLoss`.

    No input checks here (see :mod:`divco.ops.validation`); gradients come from autograd.
    """
    z = logits.to(compute_dtype(logits))
    ce = cross_entropy_per_branch(z, target, sample_weight)
    cot = cotraining_term(z, kind, temperature, sample_weight)
    if isinstance(weight, Tensor):
        weight = weight.to(z.dtype)
    loss = ce.sum() + weight * cot
    with torch.no_grad():
        ensemble = mean_over_branches(logits.detach().to(z.dtype)).to(logits.dtype)
        correct = correct_counts(z.detach(), target)
    return CotrainLoss(loss, ce.detach(), cot.detach(), ensemble, correct)


def ensemble(logits: Tensor, mode: str = "mean_logits", weights: Tensor | None = None) -> Tensor:
    """Combine branch outputs [N, S, K] into [N, K], with per-branch weights w [S] (normalised
    here to sum 1; None: w_s = 1/S).

    mean_logits  Σ_s w_s z_s
    mean_probs   Σ_s w_s softmax(z_s)
    geo_mean     softmax( Σ_s w_s log softmax(z_s) )  (weighted normalised geometric mean)
    max          max_s z_s                            (no weights)
    max_probs    max_s softmax(z_s)  (the official code's max after softmax; not renormalised; no weights)
    vote         Σ_s w_s [argmax_k z_s = k]  (SAMME's weighted majority: the shares of the vote)

    The max modes follow torch.max: a NaN is the maximum, and the gradient goes to the first
    branch holding NaN if any, else to the first maximal branch. A branch's vote follows
    torch.argmax: the first NaN class if any, else the first maximal class. The vote is
    piecewise constant: its gradient is exactly zero (w.r.t. the logits; the weights get theirs).

    A branch with weight 0 takes no part: its non-finite logits (±inf, NaN) are read as 0, so
    they cannot turn 0 · x into NaN, and it gets gradient 0. weights=None keeps the unweighted
    formulas (means divide by S before they sum), bit for bit what they were before weights.
    """
    z = logits.to(compute_dtype(logits))
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"mode must be one of {', '.join(ENSEMBLE_MODES)}; got {mode!r}")
    if weights is not None:
        if mode not in WEIGHTED_ENSEMBLE_MODES:
            raise ValueError(f"mode {mode!r} takes no weights; the modes that do: {', '.join(WEIGHTED_ENSEMBLE_MODES)}")
        return _weighted_ensemble(z, mode, weights).to(logits.dtype)
    if mode == "mean_logits":
        out = mean_over_branches(z)
    elif mode == "mean_probs":
        out = mean_over_branches(F.softmax(z, dim=-1))
    elif mode == "geo_mean":
        out = F.softmax(mean_over_branches(F.log_softmax(z, dim=-1)), dim=-1)
    elif mode == "max":
        out = z.max(dim=1).values
    elif mode == "max_probs":
        out = F.softmax(z, dim=-1).max(dim=1).values
    else:  # vote
        out = mean_over_branches(top1_votes(z)) + zero_gradient(z)
    return out.to(logits.dtype)


def top1_votes(z: Tensor) -> Tensor:
    """[N, S, K] one-hot of each branch's top-1 class (torch.argmax: NaN first, then the first maximum)."""
    return F.one_hot(z.argmax(dim=-1), z.shape[-1]).to(z.dtype)


def zero_gradient(z: Tensor) -> Tensor:
    """Exact zeros [N, K] whose gradient w.r.t. z is exactly zero (also where z is ±inf or NaN,
    where z · 0 would give NaN): what connects a piecewise-constant output to the graph."""
    return torch.where(torch.zeros_like(z, dtype=torch.bool), z, 0.0).sum(1)


def _weighted_ensemble(z: Tensor, mode: str, weights: Tensor) -> Tensor:
    w = weights.to(device=z.device, dtype=z.dtype)
    w = w / w.sum()
    absent = (w == 0)[None, :, None]
    z = torch.where(absent & ~torch.isfinite(z), 0.0, z)  # a branch of weight 0 reads no inf / NaN
    w = w[None, :, None]  # [1, S, 1]
    if mode == "mean_logits":
        return (w * z).sum(1)
    if mode == "mean_probs":
        return (w * F.softmax(z, dim=-1)).sum(1)
    if mode == "geo_mean":
        return F.softmax(weighted_log(w, F.log_softmax(z, dim=-1)).sum(1), dim=-1)  # 0 · -inf := 0
    return (w * top1_votes(z)).sum(1) + zero_gradient(z)  # vote


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
