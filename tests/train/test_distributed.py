"""Single-process parts of distributed training (the two-process run is in test_engine.py)."""

from __future__ import annotations

import torch
from torch import nn

import divco
from divco.nn import BranchBatchNorm2d
from divco.train.distributed import DistributedContext, convert_sync_batchnorm
from divco.train.runtime import epoch_order, process_shard


def test_sync_batchnorm_is_per_branch_and_keeps_the_state_dict():
    model = divco.models.create("wide_resnet16_4", num_classes=10, branches=4)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    synced = convert_sync_batchnorm(model)
    assert synced.execution == "batched"
    norms = [m for m in synced.modules() if isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, BranchBatchNorm2d) for m in norms)
    assert all(m.num_features % 4 == 0 for m in norms)  # S*C channels: one statistic per branch channel
    assert {k: v.shape for k, v in synced.state_dict().items()} == keys
    plain = divco.models.create("wide_resnet16_4", num_classes=10, branches=4)
    plain.load_state_dict(synced.state_dict())


def test_shards_partition_the_epoch():
    order = epoch_order(103, seed=7, epoch=2)
    assert torch.equal(order, epoch_order(103, seed=7, epoch=2))
    assert not torch.equal(order, epoch_order(103, seed=7, epoch=3))
    shards = [process_shard(order, rank, 4) for rank in range(4)]
    assert all(len(s) == 25 for s in shards)
    joined = torch.cat(shards)
    assert len(set(joined.tolist())) == 100 and set(joined.tolist()) <= set(order.tolist())


def test_single_process_context_is_inert():
    ctx = DistributedContext.from_env("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.metrics_group is None
    assert ctx.any(True) and not ctx.any(False)
    assert ctx.gather_objects({"a": 1}) == [{"a": 1}] and ctx.broadcast_object(3) == 3
    ctx.barrier()
    ctx.close()
