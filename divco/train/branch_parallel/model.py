"""The branch-parallel training model: own branches forward, logits of all branches out.

    shard = create_branch_shard("wide_resnet28_10", mesh, num_classes=10).to(device)
    model = BranchParallelModel(shard, mesh)            # DDP over the data group when D > 1
    step = TrainStep(model, optimizer, cot_weight=w, branches=mesh.branches)
    step(own_views(images, mesh), targets)              # images [B_local, S, C, H, W]

``model(x)`` returns ``[B, S, K]`` on every process of a gather group, so the co-training
loss (:func:`divco.ops.cotrain_loss`, inside :class:`divco.train.step.TrainStep`) sees all S
branches; its backward reaches only this process's branches.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ...models.base import BranchBatchedNetwork
from .communication import counting_allreduce_hook, gather_branch_logits
from .mesh import BranchParallelMesh


class BranchParallelModel(nn.Module):
    """This process's branch shard (wrapped in DDP over the data group when D > 1) + the logit all-gather.

    ``module`` is the shard (or its DDP wrapper), so :func:`divco.train.step.unwrap_model`
    finds the shard's BranchBatchedNetwork.  ``count_gradient_bytes`` registers a DDP
    communication hook that counts each all-reduced bucket (for the benchmark).
    """

    def __init__(self, shard: BranchBatchedNetwork, mesh: BranchParallelMesh, *,
                 device_ids: Optional[Sequence[int]] = None, count_gradient_bytes: bool = False) -> None:
        super().__init__()
        if shard.branches != mesh.branches_per_process:
            raise ValueError(f"the shard has {shard.branches} branches; this mesh gives each process "
                             f"{mesh.branches_per_process} ({mesh.branches} branches / {mesh.branch_groups} groups)")
        self.mesh = mesh
        module: nn.Module = shard
        if mesh.data_parallel > 1:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(shard, device_ids=list(device_ids) if device_ids else None,
                                             process_group=mesh.data_group)
            if count_gradient_bytes:
                module.register_comm_hook(mesh.data_group, counting_allreduce_hook)
        self.module = module

    def forward(self, images: Tensor) -> Tensor:
        own = self.module(images)
        return gather_branch_logits(own, self.mesh.gather_group, self.mesh.branch_shard, self.mesh.branch_groups)


def data_shard(batch: Tensor, mesh: BranchParallelMesh) -> Tensor:
    """This process's rows of a global batch: block ``data_rank`` of D equal blocks."""
    if batch.shape[0] % mesh.data_parallel:
        raise ValueError(f"a global batch of {batch.shape[0]} does not split into {mesh.data_parallel} data shards")
    return batch.chunk(mesh.data_parallel, dim=0)[mesh.data_rank]


def own_views(images: Tensor, mesh: BranchParallelMesh) -> Tensor:
    """``[B, S, C, H, W]`` (one view per branch) -> this process's views ``[B, S/G, C, H, W]``.

    Shared images ``[B, C, H, W]`` pass unchanged (every branch sees them).  For results
    equal to one process, every process of a gather group must draw the same S views.
    """
    if images.dim() == 4:
        return images
    if images.dim() != 5 or images.shape[1] != mesh.branches:
        raise ValueError(f"own_views expects [B, {mesh.branches}, C, H, W] or [B, C, H, W], "
                         f"got shape {tuple(images.shape)}")
    branches = mesh.own_branches
    return images[:, branches.start:branches.stop]


