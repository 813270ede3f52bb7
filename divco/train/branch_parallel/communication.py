"""The collectives of branch-parallel training, and a counter of the bytes handed to them.

:func:`gather_branch_logits` is the one collective of a training step besides DDP's gradient
all-reduce over the data group.  Its gradient: every process of a gather group computes the
same loss on the same gathered logits, so the gradient of its own logits is its own slice of
the gathered gradient.  Summing the slices over the group (the reduce-scatter that
``torch.distributed.nn.functional.all_gather`` runs in backward) would give G times the
one-process gradient; the slice needs no communication at all.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor


class CommunicationCounter:
    """Bytes and calls handed to each kind of collective by this process (its input tensors)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, kind: str, tensor: Tensor) -> None:
        self.bytes[kind] += tensor.numel() * tensor.element_size()
        self.calls[kind] += 1

    def total_bytes(self) -> int:
        return sum(self.bytes.values())


_COUNTER: list[Optional[CommunicationCounter]] = [None]


@contextlib.contextmanager
def count_communication() -> Iterator[CommunicationCounter]:
    """Count the bytes of every branch-parallel collective (and counted DDP bucket) inside the block."""
    previous = _COUNTER[0]
    counter = _COUNTER[0] = CommunicationCounter()
    try:
        yield counter
    finally:
        _COUNTER[0] = previous


def record(kind: str, tensor: Tensor) -> None:
    if _COUNTER[0] is not None:
        _COUNTER[0].add(kind, tensor)


def _all_gather_single(output: Tensor, tensor: Tensor, group) -> None:
    record("all_gather", tensor)
    # all_gather_single is all_gather_into_tensor's name from torch 2.12 on (the old one warns there)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


class _GatherBranchLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, own: Tensor, group, shard: int, shards: int) -> Tensor:
        ctx.shard = shard
        own = own.contiguous()
        gathered = own.new_empty((shards * own.shape[0], *own.shape[1:]))  # shard blocks along dim 0
        _all_gather_single(gathered, own, group)
        return gathered.view(shards, *own.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The loss is computed redundantly (identically) on every process of the group: the
        # gradient of this process's logits is its own slice, not the sum over the group.
        return grad[ctx.shard], None, None, None


def gather_branch_logits(own: Tensor, group, shard: int, shards: int) -> Tensor:
    """All-gather the logits ``[B, S/G, K]`` of the G branch shards into ``[B, S, K]`` (differentiable).

    Branch ``g*S/G + j`` of the result is branch ``j`` of shard ``g``: the order of the
    one-process model.  The backward pass returns this process's slice of the gradient (no
    communication), which is the one-process gradient because every process of the group
    computes the same loss.  ``shards == 1`` returns ``own`` unchanged.
    """
    if own.dim() != 3:
        raise ValueError(f"gather_branch_logits expects logits [B, S/G, K], got shape {tuple(own.shape)}")
    if shards == 1:
        return own
    gathered = _GatherBranchLogits.apply(own, group, shard, shards)  # [G, B, S/G, K]
    B, n, K = own.shape
    return gathered.permute(1, 0, 2, 3).reshape(B, shards * n, K)


def counting_allreduce_hook(process_group, bucket):
    """DDP communication hook: the default mean all-reduce, with its bucket counted."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    record("all_reduce", bucket.buffer())
    return default_hooks.allreduce_hook(process_group, bucket)
