"""Branch-batched layers: S branches side by side in the channel dimension.

Every ``Branch*`` layer stores the S standard weights concatenated along dim 0, so
that branch ``s``'s slice IS the weight of the corresponding ``nn.Conv2d``,
``nn.BatchNorm2d`` or ``nn.Linear``.
"""

from .branching import active_branch, active_branch_count, single_branch
from .conv import BranchConv2d, default_conv_impl, set_conv_impl
from .drop import BranchDropPath, BranchShakeDrop
from .linear import BranchLinear
from .norm import BranchBatchNorm2d, default_norm_impl, norm_act, set_norm_impl

BRANCH_LAYERS = (BranchConv2d, BranchBatchNorm2d, BranchLinear, BranchDropPath, BranchShakeDrop)

__all__ = [
    "BranchConv2d",
    "BranchBatchNorm2d",
    "BranchLinear",
    "BranchDropPath",
    "BranchShakeDrop",
    "BRANCH_LAYERS",
    "active_branch",
    "active_branch_count",
    "single_branch",
    "default_conv_impl",
    "set_conv_impl",
    "default_norm_impl",
    "set_norm_impl",
    "norm_act",
]
