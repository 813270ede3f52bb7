"""Residual blocks shared by the CIFAR ResNets, the official ImageNet ResNet-D networks and the
torchvision-layout ImageNet ResNets.

torchvision's post-activation BasicBlock/Bottleneck (stride on the 3x3 convolution),
branch-batched, with an optional squeeze-and-excitation gate, and the ResNet-D
shortcut of the official Divide-and-Co-training code: where a stage downsamples,
2x2 average pooling then a 1x1 convolution and BN (no strided 1x1 convolution).
A block reads from ``spec`` only ``groups``, ``width_per_group`` and ``se_reduction``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..nn import BranchBatchNorm2d, BranchConv2d
from ..nn.norm import norm_act


class SqueezeExcitation(nn.Module):
    """Per-branch SE: global pool, 1x1 conv, ReLU, 1x1 conv, sigmoid gate."""

    def __init__(self, channels: int, reduction: int, branches: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = BranchConv2d(channels, channels // reduction, 1, bias=True, branches=branches)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = BranchConv2d(channels // reduction, channels, 1, bias=True, branches=branches)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, spec, branches: int) -> None:
        super().__init__()
        S = branches
        self.conv1 = BranchConv2d(inplanes, planes, 3, stride, 1, branches=S)
        self.bn1 = BranchBatchNorm2d(planes, branches=S)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = BranchConv2d(planes, planes, 3, 1, 1, branches=S)
        self.bn2 = BranchBatchNorm2d(planes, branches=S)
        self.se = SqueezeExcitation(planes, spec.se_reduction, S) if spec.se_reduction else None
        self.downsample = downsample

    def last_bn(self) -> BranchBatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = norm_act(self.bn1, self.conv1(x))
        if self.se is not None:  # the SE gate sits between BN and the add: BN alone, then add + ReLU
            return self.relu(self.se(self.bn2(self.conv2(out))) + identity)
        return norm_act(self.bn2, self.conv2(out), residual=identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, spec, branches: int) -> None:
        super().__init__()
        S = branches
        width = int(planes * (spec.width_per_group / 64.0)) * spec.groups
        self.conv1 = BranchConv2d(inplanes, width, 1, branches=S)
        self.bn1 = BranchBatchNorm2d(width, branches=S)
        self.conv2 = BranchConv2d(width, width, 3, stride, 1, groups=spec.groups, branches=S)
        self.bn2 = BranchBatchNorm2d(width, branches=S)
        self.conv3 = BranchConv2d(width, planes * self.expansion, 1, branches=S)
        self.bn3 = BranchBatchNorm2d(planes * self.expansion, branches=S)
        self.relu = nn.ReLU(inplace=True)
        self.se = SqueezeExcitation(planes * self.expansion, spec.se_reduction, S) if spec.se_reduction else None
        self.downsample = downsample

    def last_bn(self) -> BranchBatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = norm_act(self.bn1, self.conv1(x))
        out = norm_act(self.bn2, self.conv2(out))
        if self.se is not None:  # the SE gate sits between BN and the add: BN alone, then add + ReLU
            return self.relu(self.se(self.bn3(self.conv3(out))) + identity)
        return norm_act(self.bn3, self.conv3(out), residual=identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_layer(block, inplanes: int, planes: int, blocks: int, stride: int, spec, branches: int):
    """One stage of ``blocks`` residual blocks; returns (the stage, its output channels)."""
    S = branches
    out = planes * block.expansion
    downsample: Optional[nn.Module] = None
    if stride != 1:
        downsample = nn.Sequential(
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
            BranchConv2d(inplanes, out, 1, branches=S),
            BranchBatchNorm2d(out, branches=S),
        )
    elif inplanes != out:
        downsample = nn.Sequential(BranchConv2d(inplanes, out, 1, branches=S), BranchBatchNorm2d(out, branches=S))
    layers = [block(inplanes, planes, stride, downsample, spec, S)]
    layers += [block(out, planes, 1, None, spec, S) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


def zero_init_last_bns(model: nn.Module) -> None:
    """Zero the scale of the last BN of every residual path (each block starts as the identity)."""
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            nn.init.zeros_(m.last_bn().weight)
