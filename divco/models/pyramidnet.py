"""PyramidNet with ShakeDrop (CIFAR, bottleneck blocks): pyramidnet164 and pyramidnet272.

The architecture follows the official Divide-and-Co-training code (after Han et al.,
2017 and Yamada et al., 2018): a 3x3 stem of 16 channels (conv + BN, no ReLU), 3n
pre-activation bottleneck blocks whose width grows additively by ``alpha / 3n`` per
block, ShakeDrop on every residual path with a probability rising linearly to a
final value, a parameter-free shortcut (2x2 average pooling where a stage
downsamples, zero channels appended where the block widens), and BN-ReLU-pool-linear
at the end.  Module names are the official ones, so a branch's state dict has the
keys of the official ``PyramidNet``.

Dividing into S branches (the paper's rule): the widening ``alpha`` and the final
ShakeDrop probability are both divided by sqrt(S); the stem keeps 16 channels.
Each branch draws its own ShakeDrop gate once per batch, as the official code does
(``shakedrop_gate="sample"``: one gate per sample and branch, a departure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import BranchBatchNorm2d, BranchConv2d, BranchLinear, BranchShakeDrop
from ..nn.drop import SHAKEDROP_GATES
from ..vocabulary import check_choice
from ..nn.branching import active_branch_count
from ..nn.norm import norm_act
from .base import BranchBatchedNetwork, init_convolutions_and_batchnorms
from .registry import register


@dataclass(frozen=True)
class PyramidNetSpec:
    """One branch of a bottleneck PyramidNet, completely."""

    depth: int  # 9n + 2
    alpha: float  # total widening over the 3n blocks (already divided for a branch)
    final_shakedrop_p: float  # ShakeDrop probability of the last block; block i has p * (i+1) / 3n
    num_classes: int = 10
    stem_width: int = 16
    #: "batch": one ShakeDrop gate per batch and branch (the official code); "sample": one per
    #: sample and branch (a departure: the original ShakeDrop paper's per-sample gate).
    shakedrop_gate: str = "batch"

    def __post_init__(self) -> None:
        check_choice("shakedrop_gate", self.shakedrop_gate, SHAKEDROP_GATES)
        if not isinstance(self.depth, int) or self.depth < 11 or (self.depth - 2) % 9:
            raise ValueError(f"a bottleneck PyramidNet's depth must be 9n+2 with n >= 1, got {self.depth!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if not 0.0 <= self.final_shakedrop_p <= 1.0:
            raise ValueError(f"final_shakedrop_p must be in [0, 1], got {self.final_shakedrop_p!r}")

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 9

    def block_planes(self) -> list[int]:
        """Bottleneck width of every block, in order (the output is 4x this).

        The width grows by ``alpha / 3n`` per block and is rounded with Python's
        ``round`` on the running float sum, as the official code does.
        """
        blocks = 3 * self.blocks_per_stage
        add_rate = self.alpha / blocks
        width = float(self.stem_width)
        planes = []
        for _ in range(blocks):
            width += add_rate
            planes.append(round(width))
        return planes

    def block_shakedrop_p(self) -> list[float]:
        blocks = 3 * self.blocks_per_stage
        return [self.final_shakedrop_p * (i + 1) / blocks for i in range(blocks)]


def add_zero_padded_shortcut(residual: Tensor, shortcut: Tensor, branches: int) -> Tensor:
    """``residual + shortcut`` with the shortcut's missing channels taken as zeros, per branch.

    Each branch's shortcut block is padded at ITS end: with activations
    ``[N, S*C, H, W]``, padding the end of the whole tensor would shift every branch
    after the first onto another branch's channels.
    """
    S = active_branch_count(branches)
    c_out, c_in = residual.shape[1] // S, shortcut.shape[1] // S
    if c_in == c_out:
        return residual + shortcut
    if c_in > c_out:
        raise ValueError(f"a PyramidNet shortcut cannot drop channels: {c_in} -> {c_out} per branch")
    # [N, S, C_in, H, W] -> [N, S, C_out, H, W]: F.pad's last three pairs are (W, H, C).
    padded = F.pad(shortcut.unflatten(1, (S, c_in)), (0, 0, 0, 0, 0, c_out - c_in))
    return residual + padded.flatten(1, 2)


class PyramidBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN, ShakeDrop."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, shakedrop_p: float, branches: int,
                 shakedrop_gate: str = "batch") -> None:
        super().__init__()
        S = branches
        self.branches = S
        self.bn1 = BranchBatchNorm2d(inplanes, branches=S)
        self.conv1 = BranchConv2d(inplanes, planes, 1, branches=S)
        self.bn2 = BranchBatchNorm2d(planes, branches=S)
        self.conv2 = BranchConv2d(planes, planes, 3, stride, 1, branches=S)
        self.bn3 = BranchBatchNorm2d(planes, branches=S)
        self.conv3 = BranchConv2d(planes, planes * self.expansion, 1, branches=S)
        self.bn4 = BranchBatchNorm2d(planes * self.expansion, branches=S)
        self.relu = nn.ReLU(inplace=True)
        self.shake_drop = BranchShakeDrop(shakedrop_p, branches=S, gate=shakedrop_gate)
        # Parameter-free shortcut: only pooling where the block downsamples.
        self.downsample: Optional[nn.Module] = (
            nn.AvgPool2d((2, 2), stride=(2, 2), ceil_mode=True) if stride != 1 else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(norm_act(self.bn2, out))
        out = self.conv3(norm_act(self.bn3, out))
        out = self.shake_drop(self.bn4(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return add_zero_padded_shortcut(out, shortcut, self.branches)


class BranchBatchedPyramidNet(BranchBatchedNetwork):
    """S bottleneck PyramidNets with ShakeDrop as one module (S=1: the standalone network)."""

    family = "cifar"

    def __init__(self, spec: PyramidNetSpec, branches: int = 1, *, execution: str = "auto") -> None:
        super().__init__(spec, branches, execution=execution)
        S = self.branches
        self.conv1 = BranchConv2d(3, spec.stem_width, 3, 1, 1, branches=S)
        self.bn1 = BranchBatchNorm2d(spec.stem_width, branches=S)
        planes = spec.block_planes()
        probabilities = spec.block_shakedrop_p()
        n = spec.blocks_per_stage
        inplanes = spec.stem_width
        for stage in range(3):
            blocks = []
            for i in range(stage * n, (stage + 1) * n):
                stride = 2 if stage > 0 and i == stage * n else 1
                blocks.append(PyramidBottleneck(inplanes, planes[i], stride, probabilities[i], S,
                                                spec.shakedrop_gate))
                inplanes = planes[i] * PyramidBottleneck.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.features = inplanes
        self.bn_final = BranchBatchNorm2d(inplanes, branches=S)
        self.relu_final = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = BranchLinear(inplanes, spec.num_classes, branches=S)
        self._init_weights()

    def _init_weights(self) -> None:
        init_convolutions_and_batchnorms(self)  # as the official code; the Linear keeps its default init

    def forward_branches(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = norm_act(self.bn_final, x)
        x = self.avgpool(x).flatten(1)
        return self.fc(x.view(x.shape[0], active_branch_count(self.branches), self.features))


# -- the model zoo -------------------------------------------------------------------------


def pyramidnet_spec(depth: int, alpha: float, num_classes: int, branches: int, divide: bool = True,
                    final_shakedrop_p: Optional[float] = None, shakedrop_gate: str = "batch") -> PyramidNetSpec:
    """The spec of one branch: alpha and the final ShakeDrop p divided by sqrt(S) (``divide``)."""
    scale = math.sqrt(branches) if divide else 1.0
    p = 0.5 / scale if final_shakedrop_p is None else final_shakedrop_p
    return PyramidNetSpec(depth, alpha / scale, p, num_classes, shakedrop_gate=shakedrop_gate)


#: name: (depth, widening alpha of the undivided network).
PYRAMIDNETS: dict[str, tuple[int, int]] = {
    "pyramidnet164": (164, 270),
    "pyramidnet272": (272, 200),
}


def _register_pyramidnet(name: str, depth: int, alpha: int) -> None:
    @register(name, family="cifar", default_num_classes=10, input_size=(3, 32, 32),
              description=f"PyramidNet-{depth} (bottleneck, alpha {alpha}) + ShakeDrop; "
                          f"divided: alpha and ShakeDrop p / sqrt(S)")
    def build(num_classes: int, branches: int = 1, divide: bool = True, execution: str = "auto",
              final_shakedrop_p: Optional[float] = None, shakedrop_gate: str = "batch") -> BranchBatchedPyramidNet:
        spec = pyramidnet_spec(depth, alpha, num_classes, branches, divide, final_shakedrop_p, shakedrop_gate)
        return BranchBatchedPyramidNet(spec, branches, execution=execution)


for _name, (_depth, _alpha) in PYRAMIDNETS.items():
    _register_pyramidnet(_name, _depth, _alpha)
