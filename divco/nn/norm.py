"""BranchBatchNorm2d: per-branch batch statistics and affine parameters."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .branching import active_branch, branch_slice, check_branches


class BranchBatchNorm2d(nn.BatchNorm2d):
    """Batch normalisation of S branches of ``num_features`` channels each.

    With the branches side by side in the channel dimension, per-branch batch
    normalisation is ordinary batch normalisation over ``S*num_features``
    channels: every channel already has its own statistics.  So all branches run
    in one ``batch_norm`` call, and ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` are the S standard ``nn.BatchNorm2d`` tensors concatenated.
    ``num_batches_tracked`` is shared by the branches (they always see the same
    number of batches).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        branches: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        check_branches(branches)
        super().__init__(
            branches * num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.branches = branches
        self.branch_features = num_features

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        index = active_branch()
        if index is None:
            self._check_input_dim(x)
            if x.shape[1] != self.num_features:
                raise ValueError(
                    f"{type(self).__name__} expects {self.num_features} channels "
                    f"({self.branches} branches x {self.branch_features}), got {x.shape[1]}"
                )
            return super().forward(x)
        return self._forward_branch(x, index)

    def _forward_branch(self, x: Tensor, index: int) -> Tensor:
        self._check_input_dim(x)
        C = self.branch_features
        if x.shape[1] != C:
            raise ValueError(
                f"{type(self).__name__} computing branch {index} expects {C} channels, got {x.shape[1]}"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            if index == 0:  # the branches share one counter: count each batch once
                self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats

        def part(t):
            return None if t is None else branch_slice(t, index, C)

        return F.batch_norm(
            x,
            part(self.running_mean) if track else None,
            part(self.running_var) if track else None,
            part(self.weight),
            part(self.bias),
            use_batch_stats,
            factor,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.branch_features}, branches={self.branches}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
