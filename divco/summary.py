"""divco.summary: parameters and multiply-accumulates per branch and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .models.base import BranchBatchedNetwork
from .nn import BranchConv2d, BranchLinear


@dataclass(frozen=True)
class ModelSummary:
    name: str
    branches: int
    input_size: tuple[int, ...]
    params_total: int
    params_per_branch: int
    macs_total: int  # multiply-accumulates of one forward pass of one image, all branches
    macs_per_branch: int
    num_classes: Optional[int] = None  # K, the classes each branch predicts (None: not a [N, S, K] / [N, K] output)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            ("model", self.name),
            ("branches", str(self.branches)),
            ("input", "x".join(str(d) for d in self.input_size)),
            ("classes", str(self.num_classes) if self.num_classes is not None else "-"),
            ("params / branch", f"{self.params_per_branch / 1e6:.3f} M"),
            ("params total", f"{self.params_total / 1e6:.3f} M"),
            ("MACs / branch", f"{self.macs_per_branch / 1e9:.4f} G"),
            ("MACs total", f"{self.macs_total / 1e9:.4f} G"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _conv_macs(module: nn.Module, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    per_output = (module.in_channels // module.groups) * kh * kw
    return output.numel() * per_output


def _linear_macs(module: nn.Module, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


@torch.no_grad()
def summary(model: nn.Module, input_size: Sequence[int] = (3, 32, 32), name: Optional[str] = None) -> ModelSummary:
    """Count parameters and multiply-accumulates (one image) of a model.

    Counts convolutions and linear layers (the usual convention: BN, activations
    and pooling are left out).  For a branch-batched model the per-branch figures
    are the totals divided by S (all branches have one architecture).
    """
    input_size = tuple(int(d) for d in input_size)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with positive sizes, got {input_size}")
    branches = model.branches if isinstance(model, BranchBatchedNetwork) else 1
    macs = [0]

    def hook(module, inputs, output):
        if isinstance(module, (BranchConv2d, nn.Conv2d)):
            macs[0] += _conv_macs(module, output)
        else:
            macs[0] += _linear_macs(module, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (BranchConv2d, BranchLinear, nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    param = next(model.parameters())
    previous_execution = getattr(model, "execution", None)
    try:
        model.eval()
        if isinstance(model, BranchBatchedNetwork):
            model.execution = "batched"
        output = model(torch.zeros((1,) + input_size, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if previous_execution is not None:
            model.execution = previous_execution
    params = sum(p.numel() for p in model.parameters())
    return ModelSummary(
        name=name or getattr(model, "model_name", type(model).__name__),
        branches=branches,
        input_size=input_size,
        params_total=params,
        params_per_branch=params // branches,
        macs_total=macs[0],
        macs_per_branch=macs[0] // branches,
        num_classes=int(output.shape[-1]) if isinstance(output, torch.Tensor) and output.dim() in (2, 3) else None,
    )
