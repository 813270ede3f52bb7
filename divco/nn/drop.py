"""Per-sample, per-branch regularisers: stochastic depth and ShakeDrop.

In a branch-batched activation ``[N, S*C, ...]`` each (sample, branch) pair is its
own residual path, so every drop decision is drawn independently per sample AND
per branch, exactly as S separate networks would draw them.  (Plain element-wise
dropout needs nothing special: use ``nn.Dropout``.)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .branching import active_branch_count, check_branches
from ..vocabulary import check_choice

#: ShakeDrop's Bernoulli gate: one per batch (and branch), as the official
#: Divide-and-Co-training code draws it, or one per sample and branch.
SHAKEDROP_GATES: tuple[str, ...] = ("batch", "sample")


def _branch_view(x: Tensor, branches: int) -> tuple[Tensor, int]:
    S = active_branch_count(branches)
    if x.dim() < 2 or x.shape[1] % S:
        raise ValueError(
            f"expected an input [N, {S}*C, ...] holding {S} branch(es), got shape {tuple(x.shape)}"
        )
    return x, S


def _per_sample_branch_shape(x: Tensor, S: int) -> tuple[int, ...]:
    # [N, S, 1, ...] broadcasts over the [N, S, C, ...] view of x.
    return (x.shape[0], S) + (1,) * (x.dim() - 1)


class _ScaleWithOtherGradient(torch.autograd.Function):
    """``x * forward_scale`` whose gradient is scaled by ``backward_scale`` instead.

    Both scales are drawn in the forward pass, so backward uses no RNG (CUDA
    graphs and torch.compile replay it deterministically).
    """

    @staticmethod
    def forward(ctx, x: Tensor, forward_scale: Tensor, backward_scale: Tensor) -> Tensor:
        ctx.save_for_backward(backward_scale)
        return x * forward_scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        (backward_scale,) = ctx.saved_tensors
        return grad * backward_scale, None, None


class BranchDropPath(nn.Module):
    """Stochastic depth: zero a residual path for a random (sample, branch) pair.

    Training: ``x * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)`` per sample and
    branch.  Evaluation: identity.
    """

    def __init__(self, p: float = 0.0, *, branches: int = 1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop probability p must be in [0, 1), got {p}")
        self.p = p
        self.branches = check_branches(branches)

    def forward(self, x: Tensor) -> Tensor:
        x, S = _branch_view(x, self.branches)
        if not self.training or self.p == 0.0:
            return x
        shape = _per_sample_branch_shape(x, S)
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
        out = x.unflatten(1, (S, -1)) * (keep / (1.0 - self.p))
        return out.flatten(1, 2)

    def extra_repr(self) -> str:
        return f"p={self.p}, branches={self.branches}"


class BranchShakeDrop(nn.Module):
    """ShakeDrop (Yamada et al., 2018), each branch with its own draws.

    Training forward: ``x * (b + alpha - b*alpha)``; backward: the gradient is
    scaled by ``b + beta - b*beta`` instead, with ``b ~ Bernoulli(1 - p)``,
    ``alpha ~ U(alpha_range)`` and ``beta ~ U(0, 1)``.  ``alpha`` and ``beta`` are
    drawn per sample and branch; the gate ``b`` once per batch and branch with
    ``gate="batch"`` (the official code's ShakeDrop, the default) or per sample and
    branch with ``gate="sample"`` (a departure from the official code).
    Evaluation: ``x`` times the expected forward factor,
    ``(1 - p) + p * mean(alpha_range)`` (``1 - p`` for the usual ``[-1, 1]``).
    """

    def __init__(
        self, p: float = 0.5, alpha_range: Sequence[float] = (-1.0, 1.0), *, branches: int = 1,
        gate: str = "batch",
    ) -> None:
        super().__init__()
        self.gate = check_choice("gate", gate, SHAKEDROP_GATES)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"ShakeDrop probability p must be in [0, 1], got {p}")
        low, high = (float(a) for a in alpha_range)
        if low > high:
            raise ValueError(f"alpha_range must be (low, high) with low <= high, got {alpha_range}")
        self.p = p
        self.alpha_range = (low, high)
        self.branches = check_branches(branches)

    def forward(self, x: Tensor) -> Tensor:
        x, S = _branch_view(x, self.branches)
        low, high = self.alpha_range
        if not self.training:
            return x * ((1.0 - self.p) + self.p * 0.5 * (low + high))
        if self.p == 0.0:
            return x
        shape = _per_sample_branch_shape(x, S)
        gate_shape = shape if self.gate == "sample" else (1,) + shape[1:]
        gate = torch.empty(gate_shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
        alpha = torch.empty(shape, dtype=x.dtype, device=x.device).uniform_(low, high)
        beta = torch.rand(shape, dtype=x.dtype, device=x.device)
        kept = gate.bool()
        # b + alpha - b*alpha is 1 where kept and alpha where dropped (likewise beta).
        forward_scale = torch.where(kept, 1.0, alpha)
        backward_scale = torch.where(kept, 1.0, beta)
        out = _ScaleWithOtherGradient.apply(x.unflatten(1, (S, -1)), forward_scale, backward_scale)
        return out.flatten(1, 2)

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha_range={self.alpha_range}, branches={self.branches}, gate={self.gate!r}"
