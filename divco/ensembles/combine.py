"""Weighted ensembles of S members' logits, in plain PyTorch: the readable reference.

``logits`` are [N, S, K] (S members side by side, as a branch-batched model returns them) and
``weights`` [S] are non-negative with a positive sum (normalised here; None = equal weights).

    mean_logits  sum_s w_s z_s                                  -> logits [N, K]
    mean_probs   sum_s w_s softmax(z_s)                         -> probabilities [N, K]
    geo_mean     softmax(sum_s w_s log_softmax(z_s)), i.e. prod_s p_s^w_s normalised
                                                                -> probabilities [N, K]
    vote         sum_s w_s onehot(argmax z_s): each member's top-1 gets its weight (SAMME's
                 rule); the shares of the vote [N, K], summing to 1 -> argmax picks the
                 weighted majority, ties going to the lowest class index (torch.argmax's rule,
                 also used for each member's own top-1).

Exact in float64 (the fused kernels are checked against this); differentiable except "vote".
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vocabulary import check_choice

#: The modes this reference combines with per-member weights. "vote" is new with issue 13
#: (to move into divco.vocabulary.ENSEMBLE_MODES when the fused ops learn it).
WEIGHTED_ENSEMBLE_MODES: tuple[str, ...] = ("mean_logits", "mean_probs", "geo_mean", "vote")

#: The modes above whose output is a logit vector rather than a distribution.
LOGIT_OUTPUT_MODES: frozenset[str] = frozenset({"mean_logits"})

WeightsLike = Union[Tensor, Sequence[float], None]


def normalized_weights(weights: WeightsLike, members: int, *, dtype: torch.dtype = torch.float64,
                       device: Optional[torch.device] = None) -> Tensor:
    """``weights`` [S] as a tensor summing to 1 (None: 1/S each); a ValueError for bad weights."""
    if weights is None:
        return torch.full((members,), 1.0 / members, dtype=dtype, device=device)
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (members,):
        raise ValueError(f"weights must have one entry per member, shape [{members}], got {tuple(w.shape)}")
    values = w.detach().cpu()
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"weights must be finite and non-negative, got {values.tolist()}")
    if not float(values.sum()) > 0:
        raise ValueError(f"weights must have a positive sum, got {values.tolist()}")
    return (w / w.sum()).to(dtype=dtype, device=device)


def weighted_ensemble(logits: Tensor, mode: str = "mean_logits", weights: WeightsLike = None) -> Tensor:
    """The weighted ensemble [N, K] of member logits [N, S, K] (see the module docstring)."""
    check_choice("mode", mode, WEIGHTED_ENSEMBLE_MODES)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor [N, S, K], got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    N, S, K = logits.shape
    if S < 1 or K < 1:
        raise ValueError(f"logits need at least one member and one class, got shape {tuple(logits.shape)}")
    w = normalized_weights(weights, S, dtype=logits.dtype, device=logits.device)[None, :, None]  # [1, S, 1]
    if mode == "mean_logits":
        return (w * logits).sum(dim=1)
    if mode == "mean_probs":
        return (w * F.softmax(logits, dim=-1)).sum(dim=1)
    if mode == "geo_mean":
        return F.softmax((w * F.log_softmax(logits, dim=-1)).sum(dim=1), dim=-1)
    top1 = F.one_hot(logits.argmax(dim=-1), K).to(logits.dtype)  # [N, S, K]
    return (w * top1).sum(dim=1)


def ensemble_prediction(logits: Tensor, mode: str = "mean_logits", weights: WeightsLike = None) -> Tensor:
    """The ensemble's top-1 class [N] (ties: the lowest class index)."""
    return weighted_ensemble(logits, mode, weights).argmax(dim=-1)


def ensemble_probabilities(logits: Tensor, mode: str = "mean_logits", weights: WeightsLike = None) -> Tensor:
    """The ensemble as a distribution [N, K]: softmax of the logit modes, the others as they are."""
    out = weighted_ensemble(logits, mode, weights)
    return F.softmax(out, dim=-1) if mode in LOGIT_OUTPUT_MODES else out
