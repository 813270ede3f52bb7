"""A process's branches of the S-branch model, and the one-process state at save and resume.

Every ``Branch*`` layer stores its S branches' tensors concatenated along dim 0, in equal
blocks, so branch shard ``g`` of G is block ``g`` of ``chunk(G, dim=0)`` of every state
entry (0-dim entries, ``num_batches_tracked``, are shared).  The shard model is the
S-branch model's architecture (its ``spec``: widths divided for S, not for S/G) with S/G
branches.  Checkpoints keep the one-process format (the S-branch state dict and the
optimiser state of its parameters), so a branch-parallel run resumes in one process and the
other way round.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ... import models
from ...models.base import BranchBatchedNetwork
from ...stacking import branch_state_dict
from .mesh import BranchParallelMesh


def shard_model_like(full: BranchBatchedNetwork, branch_groups: int) -> BranchBatchedNetwork:
    """An empty (freshly initialised) model of ``full``'s architecture with S/G branches."""
    model = type(full)(full.spec, branches=full.branches // branch_groups, execution=full.execution)
    if hasattr(full, "model_name"):
        model.model_name = full.model_name
    return model


def shard_state_dict(full_state: dict[str, Tensor], branches: int, branch_groups: int,
                     shard: int) -> dict[str, Tensor]:
    """Branch shard ``shard`` of G of a one-process S-branch state dict (copies)."""
    out = {}
    for key, value in full_state.items():
        if value.dim() == 0:
            out[key] = value.clone()
        else:
            if value.shape[0] % branches:
                raise ValueError(f"state entry {key!r} of shape {tuple(value.shape)} is not stacked over the "
                                 f"{branches} branches (dim 0 must be a multiple of S)")
            out[key] = value.chunk(branch_groups, dim=0)[shard].clone()
    return out


@torch.no_grad()
def build_branch_shard(full: BranchBatchedNetwork, mesh: BranchParallelMesh) -> BranchBatchedNetwork:
    """This process's S/G branches of ``full``, weights and buffers equal to its slice of them.

    ``branch_state_dict`` (of divco.stacking) refuses models with state outside the
    branch-batched layers, which could not be split per branch.
    """
    if full.branches != mesh.branches:
        raise ValueError(f"the model has {full.branches} branches, the branch-parallel mesh {mesh.branches}")
    branch_state_dict(full, 0)  # the check that every stateful module is branch-batched
    shard = shard_model_like(full, mesh.branch_groups)
    reference = next(iter(full.state_dict().values()))
    shard.to(device=reference.device, dtype=reference.dtype)
    shard.load_state_dict(shard_state_dict(full.state_dict(), mesh.branches, mesh.branch_groups,
                                           mesh.branch_shard), strict=True)
    shard.train(full.training)
    return shard


def create_branch_shard(name: str, mesh: BranchParallelMesh, *, num_classes: Optional[int] = None,
                        seed: Optional[int] = None, **kwargs) -> BranchBatchedNetwork:
    """``divco.models.create(name, branches=S, ...)``'s branches of this process, exactly.

    The S-branch model is built once on the CPU (its initialisation draws every branch from
    the global generator, in order; ``seed`` seeds it first when given), sliced, and freed:
    the global RNG ends where the one-process run's does.  Move the result to the device.
    """
    if seed is not None:
        torch.manual_seed(seed)
    full = models.create(name, num_classes=num_classes, branches=mesh.branches, **kwargs)
    with torch.random.fork_rng(devices=[]):  # the shard's own initialisation is overwritten: draw nothing
        return build_branch_shard(full, mesh)


def _gather_to_rank0(local: Tensor, mesh: BranchParallelMesh) -> Optional[Tensor]:
    """Concatenate this data shard's G branch shards along dim 0, on global rank 0."""
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(mesh.branch_groups)] if mesh.rank == 0 else None
    dist.gather(local, parts, dst=0, group=mesh.gather_group)
    return torch.cat(parts, dim=0) if parts is not None else None


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, mesh: BranchParallelMesh) -> Optional[dict[str, Tensor]]:
    """The one-process S-branch state dict of the model, on rank 0 (None on the other ranks).

    Collective over data shard 0's processes (the others return None at once): they hold the
    checkpointed weights and BatchNorm statistics.  Call it on every process.
    """
    state = model.state_dict()
    if mesh.branch_groups == 1:
        return {k: v.clone() for k, v in state.items()} if mesh.rank == 0 else None
    if not mesh.holds_checkpoint_state:
        return None
    full = {}
    for key, value in state.items():
        gathered = value.clone() if value.dim() == 0 else _gather_to_rank0(value, mesh)
        if mesh.rank == 0:
            full[key] = gathered
    return full if mesh.rank == 0 else None


def _parameters_by_index(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _is_per_branch(value, parameter: Tensor, factor: int) -> bool:
    """An optimiser state entry shaped like its parameter (momentum, Adam moments), of the shard or the whole."""
    return (isinstance(value, Tensor) and value.dim() > 0 and value.shape[1:] == parameter.shape[1:]
            and value.shape[0] == parameter.shape[0] * factor)


@torch.no_grad()
def gather_full_optimizer_state(optimizer: torch.optim.Optimizer,
                                mesh: BranchParallelMesh) -> Optional[dict]:
    """The one-process optimiser state dict (entries shaped like the parameters gathered), on rank 0.

    The shard model's parameters come in the order of the S-branch model's, so the
    state's parameter indices are the one-process ones.
    """
    state = optimizer.state_dict()
    if mesh.branch_groups == 1:
        return state if mesh.rank == 0 else None
    if not mesh.holds_checkpoint_state:
        return None
    params = _parameters_by_index(optimizer)
    full_state = {}
    for index in sorted(state["state"]):
        entry = {}
        for name, value in state["state"][index].items():
            if _is_per_branch(value, params[index], 1):
                value = _gather_to_rank0(value, mesh)
            elif isinstance(value, Tensor) and value.dim() > 0:
                raise ValueError(f"optimizer state {name!r} of parameter {index} has shape {tuple(value.shape)}, "
                                 f"neither 0-dim nor the parameter's {tuple(params[index].shape)}")
            entry[name] = value
        full_state[index] = entry
    return {"state": full_state, "param_groups": state["param_groups"]} if mesh.rank == 0 else None


def shard_optimizer_state(full: dict, optimizer: torch.optim.Optimizer, mesh: BranchParallelMesh) -> dict:
    """This process's part of a one-process optimiser state dict, for ``optimizer.load_state_dict``."""
    params = _parameters_by_index(optimizer)
    G, g = mesh.branch_groups, mesh.branch_shard
    state = {}
    for index, entry in full["state"].items():
        index = int(index)
        if index >= len(params):
            raise ValueError(f"the optimizer state has parameter {index}; the model has {len(params)} parameters")
        state[index] = {name: value.chunk(G, dim=0)[g].clone() if _is_per_branch(value, params[index], G) else value
                        for name, value in entry.items()}
    return {"state": state, "param_groups": full["param_groups"]}
