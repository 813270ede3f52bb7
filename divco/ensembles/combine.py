"""Weighted ensembles of S members' logits: a convenience layer over :func:`divco.ops.ensemble`.

``logits`` are [N, S, K] (S members side by side, as a branch-batched model returns them) and
``weights`` [S] are non-negative with a positive sum (normalised by the op; None = equal weights).

    mean_logits  sum_s w_s z_s                                  -> logits [N, K]
    mean_probs   sum_s w_s softmax(z_s)                         -> probabilities [N, K]
    geo_mean     softmax(sum_s w_s log_softmax(z_s)), i.e. prod_s p_s^w_s normalised
                                                                -> probabilities [N, K]
    vote         sum_s w_s onehot(argmax z_s): each member's top-1 gets its weight (SAMME's
                 rule); the shares of the vote [N, K], summing to 1 -> argmax picks the
                 weighted majority, ties going to the lowest class index (torch.argmax's rule,
                 also used for each member's own top-1).

One implementation: :func:`weighted_ensemble` is ``divco.ops.ensemble`` (float64 logits run on
its float64 reference, divco.ops.reference.ensemble, exactly; float32 / bfloat16 / float16 on the
fused kernels of the logits' device). Differentiable except "vote"; to differentiate the
weights of low-precision logits, pass ``backend="torch"`` (the fused kernels refuse weights
that require grad).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..vocabulary import PROBABILITY_MODES, WEIGHTED_ENSEMBLE_MODES, check_choice

# WEIGHTED_ENSEMBLE_MODES (the modes that combine members with weights) is divco.vocabulary's.
__all__ = ["WEIGHTED_ENSEMBLE_MODES", "LOGIT_OUTPUT_MODES", "normalized_weights", "weighted_ensemble",
           "ensemble_prediction", "ensemble_probabilities"]

#: The modes above whose output is a logit vector rather than a distribution.
LOGIT_OUTPUT_MODES: frozenset[str] = frozenset(m for m in WEIGHTED_ENSEMBLE_MODES if m not in PROBABILITY_MODES)

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


def weighted_ensemble(logits: Tensor, mode: str = "mean_logits", weights: WeightsLike = None,
                      backend: Optional[str] = None) -> Tensor:
    """The weighted ensemble [N, K] of member logits [N, S, K] (see the module docstring):
    ``divco.ops.ensemble(logits, mode, weights, backend)``. Weights on the CPU for logits on
    another device are checked there and moved."""
    check_choice("mode", mode, WEIGHTED_ENSEMBLE_MODES)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor [N, S, K], got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if isinstance(weights, Tensor) and weights.device != logits.device and weights.device.type == "cpu":
        weights = weights.detach().to(torch.float64).tolist() if weights.dim() == 1 else weights
    return ops.ensemble(logits, mode, weights=weights, backend=backend)


def ensemble_prediction(logits: Tensor, mode: str = "mean_logits", weights: WeightsLike = None) -> Tensor:
    """The ensemble's top-1 class [N] (ties: the lowest class index)."""
    return weighted_ensemble(logits, mode, weights).argmax(dim=-1)


def ensemble_probabilities(logits: Tensor, mode: str = "mean_logits", weights: WeightsLike = None) -> Tensor:
    """The ensemble as a distribution [N, K]: softmax of the logit modes, the others as they are."""
    out = weighted_ensemble(logits, mode, weights)
    return F.softmax(out, dim=-1) if mode in LOGIT_OUTPUT_MODES else out
