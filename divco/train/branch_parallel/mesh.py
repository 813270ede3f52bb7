"""The 2-D process mesh of branch-parallel training: G branch shards x D data shards.

Rank ``r`` holds branch shard ``g = r % G`` (branches ``g*S/G .. (g+1)*S/G - 1``) of data shard
``d = r // G``.  Two kinds of process groups:

- the *gather group* of data shard ``d``: ranks ``d*G .. d*G + G-1`` (consecutive, so on one
  node when G <= GPUs per node).  They see the same images and all-gather their logits;
- the *data group* of branch shard ``g``: ranks ``g, g+G, g+2G, ...``.  They hold the same
  branches and all-reduce those branches' gradients (DDP over this group only).

:func:`check_branch_parallel` validates a launch before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

def check_branch_parallel(branches: int, branch_groups: int, world_size: int, *,
                          batch_size: Optional[int] = None) -> None:
    """Raise one clear ``ValueError`` line if this mesh cannot be built.

    ``branch_groups`` (G) must divide both the branch count S and the number of processes
    (``world_size``; ``world_size // G`` is the data-parallel factor); ``batch_size`` is the
    global batch, split over the ``world_size // G`` data shards.  Call it before building
    the model or the process groups.  What a training run refuses beyond the mesh (methods,
    options) is :func:`divco.train.branch_parallel.launch.check_branch_parallel_launch`.
    """
    for name, value in (("branches", branches), ("branch_groups", branch_groups), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"branch-parallel: {name} must be a positive int, got {value!r}")
    G = branch_groups
    if branches % G:
        raise ValueError(f"branch-parallel: --branch-parallel {G} must divide the {branches} branches "
                         f"(each process holds S/G of them)")
    if world_size % G:
        raise ValueError(f"branch-parallel: --branch-parallel {G} must divide the {world_size} processes "
                         f"(WORLD_SIZE / G is the data-parallel factor); launch a multiple of {G} processes")
    data_parallel = world_size // G
    if batch_size is not None and batch_size % data_parallel:
        raise ValueError(f"branch-parallel: batch_size {batch_size} is the global batch and must be divisible by "
                         f"the {data_parallel} data-parallel shards ({world_size} processes / {G} branch groups)")


@dataclass(frozen=True)
class BranchParallelMesh:
    """Where this process sits: its branches, its data shard and the two groups it belongs to."""

    branches: int  # S, of the whole model
    branch_groups: int  # G
    world_size: int
    rank: int
    gather_group: Any = None  # None in a single process
    data_group: Any = None

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.branch_groups

    @property
    def branch_shard(self) -> int:
        return self.rank % self.branch_groups

    @property
    def data_rank(self) -> int:
        return self.rank // self.branch_groups

    @property
    def branches_per_process(self) -> int:
        return self.branches // self.branch_groups

    @property
    def own_branches(self) -> range:
        n = self.branches_per_process
        return range(self.branch_shard * n, (self.branch_shard + 1) * n)

    @property
    def gather_ranks(self) -> list[int]:
        return [self.data_rank * self.branch_groups + g for g in range(self.branch_groups)]

    @property
    def data_ranks(self) -> list[int]:
        return [d * self.branch_groups + self.branch_shard for d in range(self.data_parallel)]

    @property
    def holds_checkpoint_state(self) -> bool:
        """Data shard 0 holds the weights and BN statistics a checkpoint keeps (DDP broadcasts its buffers)."""
        return self.data_rank == 0


def build_mesh(branches: int, branch_groups: int) -> BranchParallelMesh:
    """The mesh of this process in the initialised default process group (or of a single process).

    Every process must call it (``dist.new_group`` is collective), in the same order.
    """
    if not dist.is_available() or not dist.is_initialized():
        check_branch_parallel(branches, branch_groups, 1)
        return BranchParallelMesh(branches, branch_groups, 1, 0)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_branch_parallel(branches, branch_groups, world_size)
    G, D = branch_groups, world_size // branch_groups
    gather_group = data_group = None
    for d in range(D):  # every process creates every group, in the same order
        group = dist.new_group([d * G + g for g in range(G)])
        if rank // G == d:
            gather_group = group
    for g in range(G):
        group = dist.new_group([d * G + g for d in range(D)])
        if rank % G == g:
            data_group = group
    return BranchParallelMesh(branches, G, world_size, rank, gather_group, data_group)
