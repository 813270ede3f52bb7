"""BranchLinear: one classifier per branch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .branching import active_branch, branch_slice, check_branches


class BranchLinear(nn.Module):
    """S linear layers: ``[N, S, in_features] -> [N, S, out_features]``.

    ``weight`` is ``[S*out_features, in_features]``: rows
    ``s*out_features:(s+1)*out_features`` are exactly branch ``s``'s
    ``nn.Linear(in_features, out_features).weight``; likewise the bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        branches: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.branches = check_branches(branches)
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(branches * out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(branches * out_features, **factory)) if bias else None
        self.reset_parameters()

    def branch_weight(self, index: int) -> Tensor:
        return branch_slice(self.weight, index, self.out_features)

    def branch_bias(self, index: int):
        if self.bias is None:
            return None
        return branch_slice(self.bias, index, self.out_features)

    def reset_parameters(self) -> None:
        """Initialise each branch exactly as ``nn.Linear.reset_parameters`` would."""
        # nn.Linear's fan_in is in_features, which stacking rows does not change.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        index = active_branch()
        S = self.branches if index is None else 1
        if x.dim() != 3 or x.shape[1] != S or x.shape[2] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input [N, {S}, {self.in_features}] "
                f"(N samples, {S} branch(es), {self.in_features} features), got shape {tuple(x.shape)}"
            )
        if index is not None:
            return F.linear(x, self.branch_weight(index), self.branch_bias(index))
        weight = self.weight.view(S, self.out_features, self.in_features)
        # [S, N, in] @ [S, in, out] -> [S, N, out], then back to [N, S, out].
        if self.bias is None:
            out = torch.bmm(x.transpose(0, 1), weight.transpose(1, 2))
        else:  # baddbmm, like nn.Linear's addmm, keeps autocast's dtype for the output
            out = torch.baddbmm(self.bias.view(S, 1, self.out_features), x.transpose(0, 1), weight.transpose(1, 2))
        return out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"branches={self.branches}, bias={self.bias is not None}"
        )
