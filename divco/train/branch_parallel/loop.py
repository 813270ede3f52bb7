"""A standalone branch-parallel training loop on synthetic batches, and its one-process reference.

The equality tests and ``divco.benchmark.branch_parallel`` drive it: :func:`spawn` starts P
gloo (or NCCL) processes running :func:`train_branch_parallel`, and
:func:`train_one_process` trains all S branches in one process on the same batches.  With
D > 1 data shards the reference accumulates the D shards' gradients (their mean, what DDP
all-reduces; each shard's BatchNorm normalises its own images) and keeps shard 0's BatchNorm
running statistics (DDP broadcasts data rank 0's buffers).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ... import models, ops
from ..step import RunningMetrics, TrainStep, unwrap_model
from .communication import count_communication
from .mesh import BranchParallelMesh, build_mesh
from .model import BranchParallelModel, data_shard, own_views
from .sharding import (
    create_branch_shard,
    gather_full_optimizer_state,
    gather_full_state_dict,
    shard_optimizer_state,
    shard_state_dict,
)


@dataclass(frozen=True)
class LoopConfig:
    model: str = "wide_resnet16_1"
    num_classes: int = 5
    branches: int = 4
    image_size: int = 8
    batch_size: int = 8  # global
    steps: int = 3
    seed: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cot_weight: float = 0.5
    execution: str = "auto"


def synthetic_batch(config: LoopConfig, step: int) -> tuple[Tensor, Tensor]:
    """Global batch ``step``: one view per branch ``[B, S, 3, H, W]`` and labels ``[B]`` (a function of seed, step)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    size = config.image_size
    images = torch.randn(config.batch_size, config.branches, 3, size, size, generator=generator)
    targets = torch.randint(0, config.num_classes, (config.batch_size,), generator=generator)
    return images, targets


def make_optimizer(model: nn.Module, config: LoopConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _full_model(config: LoopConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    model = models.create(config.model, num_classes=config.num_classes, branches=config.branches)
    model.execution = config.execution
    return model


def train_one_process(config: LoopConfig, *, data_parallel: int = 1, start: Optional[dict] = None,
                      first_step: int = 0) -> dict:
    """All S branches in one process, steps ``first_step .. config.steps - 1``; returns a checkpoint + metrics."""
    model = _full_model(config)
    optimizer = make_optimizer(model, config)
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
    cot_weight = torch.tensor(config.cot_weight)
    metrics = RunningMetrics(config.branches, torch.device("cpu"))
    losses = []
    buffers = list(model.buffers())
    for step in range(first_step, config.steps):
        images, targets = synthetic_batch(config, step)
        optimizer.zero_grad(set_to_none=True)
        before = [b.clone() for b in buffers]
        kept = None
        for d in reversed(range(data_parallel)):  # shard 0 last: its running statistics are kept
            with torch.no_grad():
                for b, b0 in zip(buffers, before):
                    b.copy_(b0)
            rows = images.chunk(data_parallel)[d], targets.chunk(data_parallel)[d]
            out = ops.cotrain_loss(model(rows[0]), rows[1], weight=cot_weight)  # TrainStep.loss's call
            (out.loss / data_parallel).backward()
            metrics.add(out, rows[0].shape[0])
            kept = out
        optimizer.step()
        losses.append(float(kept.loss.detach()))
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": optimizer.state_dict(),
            "metrics": metrics.read(), "losses": losses}


def train_branch_parallel(config: LoopConfig, mesh: BranchParallelMesh, *, start: Optional[dict] = None,
                          first_step: int = 0, count: bool = False) -> Optional[dict]:
    """This process's part of branch-parallel training; rank 0 returns the gathered checkpoint + metrics."""
    shard = create_branch_shard(config.model, mesh, num_classes=config.num_classes, seed=config.seed)
    shard.execution = config.execution
    model = BranchParallelModel(shard, mesh, count_gradient_bytes=count)
    optimizer = make_optimizer(shard, config)
    if start is not None:
        shard.load_state_dict(shard_state_dict(start["model"], mesh.branches, mesh.branch_groups, mesh.branch_shard))
        optimizer.load_state_dict(shard_optimizer_state(start["optimizer"], optimizer, mesh))
    step_fn = TrainStep(model, optimizer, cot_weight=torch.tensor(config.cot_weight), branches=mesh.branches)
    losses, seconds = [], []
    with count_communication() as counter:
        for step in range(first_step, config.steps):
            images, targets = synthetic_batch(config, step)
            images, targets = own_views(data_shard(images, mesh), mesh), data_shard(targets, mesh)
            began = time.perf_counter()
            out = step_fn(images, targets)
            seconds.append(time.perf_counter() - began)
            losses.append(float(out.loss.detach()))
    metrics = step_fn.metrics.read(process_group=mesh.data_group if mesh.world_size > 1 else None)
    full = gather_full_state_dict(unwrap_model(model), mesh)
    full_optimizer = gather_full_optimizer_state(optimizer, mesh)
    if mesh.rank != 0:
        return None
    return {"model": full, "optimizer": full_optimizer, "metrics": metrics, "losses": losses, "seconds": seconds,
            "bytes": dict(counter.bytes), "calls": dict(counter.calls)}


# -- processes --------------------------------------------------------------------------------

def _worker(rank: int, world_size: int, store: str, target: Callable, args: tuple, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        out = target(*args)
        if rank == 0:
            torch.save(out, result)
    finally:
        dist.destroy_process_group()


def spawn(target: Callable, world_size: int, *args) -> object:
    """Run ``target(*args)`` in ``world_size`` spawned gloo processes; return rank 0's result.

    ``target`` must be importable (a module-level function) and build its own mesh.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="divco-bp-") as folder:
        store, result = os.path.join(folder, "store"), os.path.join(folder, "result.pt")
        mp.start_processes(_worker, args=(world_size, store, target, args, result), nprocs=world_size,
                           start_method="spawn")
        return torch.load(result, weights_only=False)


def run_branch_parallel(config: LoopConfig, branch_groups: int, start: Optional[dict] = None,
                        first_step: int = 0, count: bool = False) -> Optional[dict]:
    """The spawned target: build the mesh, train (see :func:`train_branch_parallel`)."""
    mesh = build_mesh(config.branches, branch_groups)
    return train_branch_parallel(config, mesh, start=start, first_step=first_step, count=count)


def logits_gradient_check(config: LoopConfig, mesh: BranchParallelMesh) -> dict:
    """The gradient of this process's logits through :func:`gather_branch_logits` and through
    ``torch.distributed.nn.functional.all_gather`` (whose backward sums the group's gradients),
    beside the one-process gradient of the same loss on the full logits."""
    from torch.distributed.nn.functional import all_gather as summing_all_gather

    from .communication import gather_branch_logits

    generator = torch.Generator().manual_seed(config.seed + 17)
    B, S, K = config.batch_size, config.branches, config.num_classes
    full = torch.randn(B, S, K, generator=generator, requires_grad=True)
    targets = torch.randint(0, K, (B,), generator=generator)
    weight = torch.tensor(config.cot_weight)
    ops.cotrain_loss(full, targets, weight=weight).loss.backward()
    branches = mesh.own_branches
    own = full.detach()[:, branches.start:branches.stop].clone().requires_grad_(True)
    gathered = gather_branch_logits(own, mesh.gather_group, mesh.branch_shard, mesh.branch_groups)
    ops.cotrain_loss(gathered, targets, weight=weight).loss.backward()
    summed = None
    if mesh.data_parallel == 1:  # its gloo backward scatters from global rank 0: groups without it fail
        other = own.detach().clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated from torch 2.12 on, still the reference
            parts = summing_all_gather(other, group=mesh.gather_group)
        ops.cotrain_loss(torch.cat(parts, dim=1), targets, weight=weight).loss.backward()
        summed = other.grad
    return {"one_process": full.grad[:, branches.start:branches.stop], "gathered": own.grad,
            "summing_all_gather": summed, "logits_equal": torch.equal(gathered.detach(), full.detach())}


def inference_check(config: LoopConfig, mesh: BranchParallelMesh, state: dict, modes: tuple[str, ...]) -> dict:
    """The branch-parallel ensemble of a trained state (eval mode) for ``modes``, on shared test images."""
    from .inference import branch_parallel_ensemble

    shard = create_branch_shard(config.model, mesh, num_classes=config.num_classes)
    shard.load_state_dict(shard_state_dict(state, mesh.branches, mesh.branch_groups, mesh.branch_shard))
    shard.eval()
    images = torch.randn(config.batch_size, 3, config.image_size, config.image_size,
                         generator=torch.Generator().manual_seed(config.seed + 23))
    return {mode: branch_parallel_ensemble(shard, data_shard(images, mesh), mesh, mode=mode) for mode in modes}


def run_checks(config: LoopConfig, branch_groups_list: tuple[int, ...], resume_from: Optional[dict] = None,
               resume_step: int = 0, modes: tuple[str, ...] = ()) -> Optional[dict]:
    """The spawned target of the equality tests: per G, train from scratch; with ``resume_from`` (a
    one-process checkpoint after ``resume_step`` steps) also resume from it; the logits-gradient
    check and, with ``modes``, the ensembles of the trained state.  Rank 0 returns every result."""
    results = {}
    for G in branch_groups_list:
        mesh = build_mesh(config.branches, G)
        out = {"train": train_branch_parallel(config, mesh, count=True), "gradient": logits_gradient_check(config, mesh)}
        if resume_from is not None:
            out["resumed"] = train_branch_parallel(config, mesh, start=resume_from, first_step=resume_step)
        if modes:
            trained = out["train"]["model"] if mesh.rank == 0 else None
            box = [trained]
            dist.broadcast_object_list(box, src=0)
            out["ensemble"] = inference_check(config, mesh, box[0], modes)
        results[G] = out
    return results if dist.get_rank() == 0 else None


__all__ = ["LoopConfig", "synthetic_batch", "train_one_process", "train_branch_parallel", "spawn",
           "run_branch_parallel", "run_checks"]
