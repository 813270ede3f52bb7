"""Ensemble weights fitted on held-out data: the mixture weights that maximise its likelihood.

For members j = 1..M with probabilities q_ij = p_j(y_i | x_i) of the true class of held-out
image i, the weights w (w_j >= 0, sum 1) maximise

    L(w) = mean_i log(sum_j w_j q_ij)

the log-likelihood of the weighted mean of the members' probabilities (divco's ``mean_probs``
ensemble). L is concave in w, so the EM fixed point

    w_j <- mean_i (w_j q_ij / sum_k w_k q_ik)

from uniform weights climbs to its maximum monotonically; a member that adds nothing on the
held-out images gets a weight near 0 (a weak early checkpoint no longer drags the ensemble
down), and the ensemble's held-out NLL is never above its best member's. Deterministic
(float64, a fixed number of iterations), so a resumed run fits the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

EM_ITERATIONS = 500
#: Probabilities below this are raised to it (a member sure of a wrong class must not make L infinite).
PROBABILITY_FLOOR = 1e-12


def true_class_probabilities(logits: Tensor, labels: Tensor) -> Tensor:
    """``[N]`` probability of the true class from logits ``[N, K]`` (float64)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, K] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return torch.softmax(logits.double(), -1).gather(1, labels.long()[:, None]).squeeze(1)


def heldout_weights(true_class_probs: Tensor, iterations: int = EM_ITERATIONS) -> list[float]:
    """The mixture weights ``[M]`` (sum 1) that maximise the mean log-likelihood of ``[N, M]`` probabilities."""
    if true_class_probs.ndim != 2 or true_class_probs.shape[0] < 1 or true_class_probs.shape[1] < 1:
        raise ValueError(f"expected true-class probabilities [N, M] with N, M >= 1, got "
                         f"{tuple(true_class_probs.shape)}")
    q = true_class_probs.double().clamp_min(PROBABILITY_FLOOR)
    if not torch.isfinite(q).all() or (q > 1 + 1e-9).any():
        raise ValueError("true-class probabilities must be finite and at most 1")
    members = q.shape[1]
    weights = torch.full((members,), 1.0 / members, dtype=torch.float64)
    for _ in range(iterations):
        share = weights * q
        weights = (share / share.sum(1, keepdim=True)).mean(0)
    return (weights / weights.sum()).tolist()


def mean_log_likelihood(true_class_probs: Tensor, weights) -> float:
    """L(w) of :func:`heldout_weights`."""
    q = true_class_probs.double().clamp_min(PROBABILITY_FLOOR)
    return float(torch.log(q @ torch.as_tensor(weights, dtype=torch.float64)).mean())
