"""Which branches a branch-batched layer computes right now.

A branch-batched network normally runs every branch at once: activations are
``[N, S*C, H, W]`` and each layer uses its whole weight.  It can also run one branch
at a time ("per-branch execution"): the network's forward loops over the branches
and, inside :func:`single_branch`, every ``Branch*`` layer uses only that branch's
slice of its weights on a ``[N, C, H, W]`` activation.  Both compute the same
function; per-branch execution keeps each branch's working set small, which is
what makes it the faster choice on CPUs (see ``BranchBatchedNetwork.execution``).

The active branch is a module-level variable rather than an argument so that the
model code (``nn.Sequential`` of blocks) is written once for both modes.
torch.compile traces it (the value is a Python int guarded by Dynamo).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import Tensor

# One-element lists so that Dynamo sees mutable globals, not rebindings.
_ACTIVE_BRANCH: list[Optional[int]] = [None]
# During one per-branch pass: parameter -> its S slices, split once.  Slicing a
# parameter S times separately would make autograd zero-fill and add a full-size
# gradient per slice (S^2 weight-sized writes); one split gives one concatenation.
_PASS_SLICES: list[Optional[dict]] = [None]


def active_branch() -> Optional[int]:
    """The branch being computed alone, or ``None`` when all branches run together."""
    return _ACTIVE_BRANCH[0]


@contextlib.contextmanager
def single_branch(index: int) -> Iterator[None]:
    """Inside this context, ``Branch*`` layers compute branch ``index`` only."""
    previous = _ACTIVE_BRANCH[0]
    _ACTIVE_BRANCH[0] = index
    try:
        yield
    finally:
        _ACTIVE_BRANCH[0] = previous


@contextlib.contextmanager
def per_branch_pass() -> Iterator[None]:
    """Wrap a loop over all branches: parameters are split once for the whole loop."""
    previous = _PASS_SLICES[0]
    _PASS_SLICES[0] = {}
    try:
        yield
    finally:
        _PASS_SLICES[0] = previous


def branch_slice(tensor: Tensor, index: int, size: int) -> Tensor:
    """Rows ``[index*size, (index+1)*size)`` of ``tensor`` (a view)."""
    cache = _PASS_SLICES[0]
    if cache is None or not tensor.requires_grad:
        return tensor.narrow(0, index * size, size)
    slices = cache.get(tensor)
    if slices is None:
        slices = cache[tensor] = tensor.split(size)
    return slices[index]


def active_branch_count(branches: int) -> int:
    """How many branches an activation holds right now (``branches`` or 1)."""
    return branches if _ACTIVE_BRANCH[0] is None else 1


def check_branches(branches: int) -> int:
    if not isinstance(branches, int) or isinstance(branches, bool) or branches < 1:
        raise ValueError(f"branches must be a positive int, got {branches!r}")
    return branches
