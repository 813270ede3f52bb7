"""BranchBatchedNetwork: what every divco model shares (input handling, execution)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn import BranchBatchNorm2d, BranchConv2d, single_branch
from ..nn.branching import check_branches, per_branch_pass

EXECUTIONS = ("auto", "batched", "per_branch")


def init_convolutions_and_batchnorms(model: nn.Module) -> None:
    """The ResNet family's initialisation (torchvision's and the official code's): He-normal
    (fan_out, per branch) convolutions with zero biases, unit-scale zero-shift BatchNorms."""
    for m in model.modules():
        if isinstance(m, BranchConv2d):
            m.kaiming_normal_(mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, BranchBatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def default_execution(x: Tensor) -> str:
    """How to run the branches for this input: all at once, or one after another.

    On a CPU the S branches run fastest one after another: each branch's
    activations stay small enough for the caches and allocator, which a
    4x-wider batched activation does not (measured in bench/cpu_conv_strategies.py).
    On a GPU all branches run at once, one launch per layer.
    """
    return "per_branch" if x.device.type == "cpu" else "batched"


class BranchBatchedNetwork(nn.Module):
    """S networks of one architecture run as one module.

    Input: ``[N, C, H, W]`` (every branch sees the same image) or
    ``[N, S, C, H, W]`` (one view per branch, as co-training uses).
    Output: logits ``[N, S, num_classes]``, also for S=1.

    ``spec`` describes ONE branch's architecture completely (a frozen dataclass);
    two models with equal specs have identical branches, which is what
    :func:`divco.stack` checks.  ``execution`` chooses how the branches run:
    ``"batched"`` (all at once: grouped convolutions over ``[N, S*C, H, W]``),
    ``"per_branch"`` (one branch at a time on its slice of every weight), or
    ``"auto"`` (:func:`default_execution`).  Both give the same result.
    """

    #: "cifar" (32x32 inputs) or "imagenet"; set by subclasses.
    family: str = ""

    def __init__(self, spec: Any, branches: int = 1, *, in_channels: int = 3, execution: str = "auto") -> None:
        super().__init__()
        self.spec = spec
        self.branches = check_branches(branches)
        self.in_channels = in_channels
        self.num_classes = spec.num_classes
        self.execution = execution

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {value!r}")
        self._execution = value

    # -- to implement ------------------------------------------------------------------
    def forward_branches(self, x: Tensor) -> Tensor:
        """``[N, S_active*C_in, H, W]`` (or ``[N, C_in, H, W]`` shared) -> ``[N, S_active, K]``."""
        raise NotImplementedError

    def standalone_model(self) -> nn.Module:
        """A fresh ordinary model with one branch's architecture (what unstack returns)."""
        return type(self)(self.spec, branches=1)

    # -- forward -----------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> bool:
        """Validate ``x``; return True if it holds one view per branch."""
        S, C = self.branches, self.in_channels
        if not isinstance(x, Tensor):
            raise ValueError(f"{type(self).__name__} expects a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects a floating-point input, got dtype {x.dtype}")
        self._check_dtype_and_size(x)
        if x.dim() == 4:
            if x.shape[1] != C:
                raise ValueError(
                    f"{type(self).__name__} expects {C} input channels ([N, {C}, H, W]), "
                    f"got shape {tuple(x.shape)}"
                )
            return False
        if x.dim() == 5:
            if x.shape[1] != S:
                raise ValueError(
                    f"{type(self).__name__} has {S} branch(es) and expects one view per branch "
                    f"([N, {S}, {C}, H, W]), got {x.shape[1]} views (shape {tuple(x.shape)})"
                )
            if x.shape[2] != C:
                raise ValueError(
                    f"{type(self).__name__} expects {C} input channels ([N, {S}, {C}, H, W]), "
                    f"got shape {tuple(x.shape)}"
                )
            return True
        raise ValueError(
            f"{type(self).__name__} expects [N, {C}, H, W] or [N, {S}, {C}, H, W] input, "
            f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )

    def _check_dtype_and_size(self, x: Tensor) -> None:
        """The input's dtype must be the weights' (autocast excepted) and its images non-empty."""
        weight = next(self.parameters(), None)
        autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
        if weight is not None and x.dtype != weight.dtype and not autocast:
            raise ValueError(
                f"{type(self).__name__} has {weight.dtype} weights and got a {x.dtype} input; convert one "
                f"of them (e.g. images.to({weight.dtype}) or model.to({x.dtype}))"
            )
        if x.dim() >= 4 and (x.shape[-1] < 1 or x.shape[-2] < 1):
            raise ValueError(
                f"{type(self).__name__} expects images of at least 1x1 pixels, got "
                f"{x.shape[-2]}x{x.shape[-1]} (shape {tuple(x.shape)})"
            )

    def resolved_execution(self, x: Tensor) -> str:
        if self.branches == 1:
            return "batched"
        return default_execution(x) if self._execution == "auto" else self._execution

    def forward(self, x: Tensor) -> Tensor:
        per_view = self._check_input(x)
        if self.resolved_execution(x) == "per_branch":
            outputs = []
            with per_branch_pass():
                for s in range(self.branches):
                    with single_branch(s):
                        outputs.append(self.forward_branches(x[:, s] if per_view else x))
            return torch.cat(outputs, dim=1)
        if per_view:
            x = x.flatten(1, 2)  # [N, S*C, H, W]: branch s owns channel block s
        return self.forward_branches(x)

    def extra_repr(self) -> str:
        return f"branches={self.branches}, num_classes={self.num_classes}, execution={self._execution!r}"
