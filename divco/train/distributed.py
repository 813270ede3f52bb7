"""Distributed data parallel through torchrun: process groups and the few collectives the loop needs.

    torchrun --nproc_per_node=4 -m divco train --model wide_resnet28_10 --branches 4 ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; :meth:`DistributedContext.from_env` joins
the process group (NCCL for CUDA, gloo for CPU).  A second gloo group carries host-side
decisions (stop now? which images?) so they never touch the GPU stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    control_group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "DistributedContext":
        """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend)
            owns = True
        control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=owns, control_group=control)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives (no-ops for a single process) ---------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control_group)

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any (a host-side all-reduce)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(value.item())  # a CPU tensor: no device synchronisation

    def gather_objects(self, obj: Any) -> list:
        """Every process's ``obj``, indexed by rank (on every process)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def broadcast_object(self, obj: Optional[Any]) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    @property
    def metrics_group(self):
        """The group for device-tensor reductions (the default group), or None alone."""
        return dist.group.WORLD if self.enabled else None


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Synchronised BatchNorm for a branch-batched model, forcing batched execution.

    BranchBatchNorm2d is an ``nn.BatchNorm2d`` over S*C channels, so the SyncBatchNorm that
    replaces it normalises every channel of every branch on its own: exactly per-branch
    SyncBN.  SyncBatchNorm lacks the one-branch forward of per-branch execution, so the
    branches must run batched.  The state-dict keys do not change: checkpoints load into
    the plain model.
    """
    model.execution = "batched"
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
