"""Branch-parallel inference: the S branches of a trained model on several processes or devices.

Two forms, both combining the gathered logits ``[B, S, K]`` with :func:`divco.ops.ensemble`:

- :func:`branch_parallel_ensemble`: one process per branch shard (torchrun), the logits
  all-gathered over the gather group; each data shard predicts its own images;
- :class:`MultiDeviceBranches`: one process, the branch shards on a list of devices (their
  kernels run concurrently, each device's launches being asynchronous), the logits copied to
  the first device.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ... import ops
from ...models.base import BranchBatchedNetwork
from .communication import gather_branch_logits
from .mesh import BranchParallelMesh, check_branch_parallel
from .sharding import build_branch_shard, shard_model_like, shard_state_dict


class GatheredBranches(nn.Module):
    """A branch shard whose forward returns the logits ``[B, S, K]`` of all S branches (collective over
    its gather group: every process of the group calls it on the same images)."""

    def __init__(self, shard: nn.Module, mesh: BranchParallelMesh) -> None:
        super().__init__()
        self.shard, self.mesh = shard, mesh

    def forward(self, images: Tensor) -> Tensor:
        return gather_branch_logits(self.shard(images), self.mesh.gather_group, self.mesh.branch_shard,
                                    self.mesh.branch_groups)


def spread_over_processes(model: BranchBatchedNetwork, mesh: BranchParallelMesh) -> GatheredBranches:
    """A trained S-branch model as this process's branch shard, its forward gathering all S branches' logits."""
    return GatheredBranches(build_branch_shard(model, mesh), mesh)


@torch.no_grad()
def branch_parallel_logits(shard: nn.Module, images: Tensor, mesh: BranchParallelMesh) -> Tensor:
    """The logits ``[B, S, K]`` of all S branches for ``images`` (the same images on every process of a gather group)."""
    return gather_branch_logits(shard(images), mesh.gather_group, mesh.branch_shard, mesh.branch_groups)


@torch.no_grad()
def branch_parallel_ensemble(shard: nn.Module, images: Tensor, mesh: BranchParallelMesh, *,
                             mode: str = "mean_logits", weights=None, backend: Optional[str] = None) -> Tensor:
    """The ensemble prediction ``[B, K]`` of the S branches (on every process of the gather group)."""
    return ops.ensemble(branch_parallel_logits(shard, images, mesh), mode, weights, backend=backend)


class MultiDeviceBranches(nn.Module):
    """A trained S-branch model split into ``len(devices)`` branch shards, one per device, in one process."""

    def __init__(self, model: BranchBatchedNetwork, devices: Sequence[torch.device | str]) -> None:
        super().__init__()
        devices = [torch.device(d) for d in devices]
        check_branch_parallel(model.branches, len(devices), len(devices))
        state = model.state_dict()
        shards = []
        for g, device in enumerate(devices):
            shard = shard_model_like(model, len(devices))
            shard.load_state_dict(shard_state_dict(state, model.branches, len(devices), g), strict=True)
            shards.append(shard.to(device).train(model.training))
        self.shards = nn.ModuleList(shards)
        self.devices = devices
        self.branches = model.branches

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> logits ``[B, S, K]`` on the first device."""
        own = [shard(images.to(device, non_blocking=True)) for shard, device in zip(self.shards, self.devices)]
        return torch.cat([logits.to(self.devices[0], non_blocking=True) for logits in own], dim=1)

    @torch.no_grad()
    def ensemble(self, images: Tensor, *, mode: str = "mean_logits", weights=None,
                 backend: Optional[str] = None) -> Tensor:
        return ops.ensemble(self(images), mode, weights, backend=backend)
