"""BranchParallelLayout: the engine's hooks for ``--branch-parallel G`` (divco.train.layout).

Rank r holds branch shard ``r % G`` (S/G branches, built as that slice of the one-process
model) of data shard ``r // G``.  The G processes of a gather group take the same rows of
the epoch's order and draw the same S views (their augmenters are seeded by the data shard),
each feeds its own branches' views, and the logits are all-gathered before the loss.  The
epoch's metrics are summed over the data group (every gather group holds all S branches'
metrics of its images), data shard 0's gather group evaluates, and checkpoints hold the
one-process state: gathered to rank 0 at save, sliced at resume.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..distributed import DistributedContext
from ..layout import TrainingLayout
from .inference import GatheredBranches
from .mesh import build_mesh
from .model import BranchParallelModel, own_views
from .sharding import (
    create_branch_shard,
    gather_full_optimizer_state,
    gather_full_state_dict,
    shard_optimizer_state,
    shard_state_dict,
)


class BranchParallelLayout(TrainingLayout):
    def __init__(self, config: Any, processes: DistributedContext) -> None:
        super().__init__(processes)
        self.branch_groups = config.branch_parallel
        self.mesh = build_mesh(config.branches, config.branch_parallel)  # collective: every process, same order

    @property
    def data_rank(self) -> int:
        return self.mesh.data_rank

    @property
    def data_parallel(self) -> int:
        return self.mesh.data_parallel

    def model_inputs(self, views: Tensor) -> Tensor:
        return own_views(views, self.mesh)

    def build_model(self, build: Callable[[], nn.Module], config: Any, device: torch.device, num_classes: int,
                    channels_last: bool) -> nn.Module:
        from ..runtime import option

        try:  # the whole model once on the CPU, as one process builds it: the same weights and RNG after
            shard = create_branch_shard(config.model, self.mesh, num_classes=num_classes, **config.model_kwargs)
        except TypeError as error:
            import json

            raise ValueError(f"{option('model_kwargs', json.dumps(config.model_kwargs))} does not fit "
                             f"{config.model}: {error}") from None
        shard.execution = config.execution
        shard.to(device)
        if channels_last:
            shard.to(memory_format=torch.channels_last)
        return shard

    def training_model(self, net: nn.Module, device: torch.device) -> nn.Module:
        return BranchParallelModel(net, self.mesh, device_ids=[device.index] if device.type == "cuda" else None)

    def parameter_count(self, net: nn.Module) -> int:
        return super().parameter_count(net) * self.branch_groups  # every parameter is stacked over the branches

    @property
    def metrics_group(self):
        return self.mesh.data_group

    def evaluation_model(self, model: nn.Module) -> Optional[nn.Module]:
        return GatheredBranches(model, self.mesh) if self.mesh.data_rank == 0 else None

    def full_state(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Optional[dict], Optional[dict]]:
        return gather_full_state_dict(net, self.mesh), gather_full_optimizer_state(optimizer, self.mesh)

    def load_state(self, net: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                   optimizer_state: dict) -> None:
        mesh = self.mesh
        net.load_state_dict(shard_state_dict(model_state, mesh.branches, mesh.branch_groups, mesh.branch_shard))
        optimizer.load_state_dict(shard_optimizer_state(optimizer_state, optimizer, mesh))

    def describe(self) -> str:
        mesh = self.mesh
        branches = mesh.own_branches
        return (f"{mesh.world_size} processes branch-parallel ({mesh.branch_groups} branch groups x "
                f"{mesh.data_parallel} data shards; this one: branches {branches.start}-{branches.stop - 1}, data "
                f"shard {mesh.data_rank})")
