"""CIFAR ResNets (32x32 inputs): Wide-ResNet, ResNet-110/164, SE-ResNet, ResNeXt-29.

The architecture follows the official Divide-and-Co-training code: torchvision's
post-activation BasicBlock/Bottleneck with a 3x3 stem, three stages (strides 1, 2,
2), a ResNet-D shortcut (2x2 average pooling, then a 1x1 convolution) where a
stage downsamples, zero-initialised last BN of every residual path, and a linear
classifier on globally pooled features.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from torch import Tensor, nn

from ..nn import BranchBatchNorm2d, BranchConv2d, BranchLinear
from ..nn.branching import active_branch_count
from ..nn.norm import norm_act
from .base import BranchBatchedNetwork, init_convolutions_and_batchnorms
from .dividing import cifar_base_width, divided_groups, divided_widen_factor
from .registry import register


@dataclass(frozen=True)
class CifarResNetSpec:
    """One branch of a CIFAR ResNet, completely."""

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, ...]  # residual blocks per stage
    stem_width: int  # channels after the stem convolution
    widths: tuple[int, ...]  # "planes" of each stage (the output is planes * expansion)
    groups: int = 1  # cardinality of the 3x3 convolution (ResNeXt)
    width_per_group: int = 64  # bottleneck width = int(planes * width_per_group / 64) * groups
    se_reduction: int = 0  # squeeze-and-excitation reduction ratio; 0 = no SE
    dropout: float = 0.0  # dropout before the classifier
    num_classes: int = 10
    zero_init_residual: bool = True

    def __post_init__(self) -> None:
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.layers) != len(self.widths):
            raise ValueError(f"layers {self.layers} and widths {self.widths} must have the same length")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("a basic block supports only groups=1 and width_per_group=64")


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

    def __init__(self, inplanes, planes, stride, downsample, spec: CifarResNetSpec, branches: int) -> None:
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

    def __init__(self, inplanes, planes, stride, downsample, spec: CifarResNetSpec, branches: int) -> None:
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


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class BranchBatchedCifarResNet(BranchBatchedNetwork):
    """S CIFAR ResNets (WRN, ResNet-110/164, SE-ResNet, ResNeXt-29) as one module."""

    family = "cifar"

    def __init__(self, spec: CifarResNetSpec, branches: int = 1, *, execution: str = "auto") -> None:
        super().__init__(spec, branches, execution=execution)
        S = branches
        block = _BLOCKS[spec.block]
        self.conv1 = BranchConv2d(3, spec.stem_width, 3, 1, 1, branches=S)
        self.bn1 = BranchBatchNorm2d(spec.stem_width, branches=S)
        self.relu = nn.ReLU(inplace=True)
        inplanes = spec.stem_width
        for i, (planes, blocks) in enumerate(zip(spec.widths, spec.layers)):
            stride = 1 if i == 0 else 2
            layer, inplanes = self._make_layer(block, inplanes, planes, blocks, stride)
            self.add_module(f"layer{i + 1}", layer)
        self.num_stages = len(spec.layers)
        self.features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.fc = BranchLinear(inplanes, spec.num_classes, branches=S)
        self._init_weights()

    def _make_layer(self, block, inplanes: int, planes: int, blocks: int, stride: int):
        S, spec = self.branches, self.spec
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

    def _init_weights(self) -> None:
        init_convolutions_and_batchnorms(self)
        for m in self.modules():
            if isinstance(m, BranchLinear):
                nn.init.normal_(m.weight, std=1e-3)
                nn.init.zeros_(m.bias)
        if self.spec.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward_branches(self, x: Tensor) -> Tensor:
        x = norm_act(self.bn1, self.conv1(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x).flatten(1)
        x = x.view(x.shape[0], active_branch_count(self.branches), self.features)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


# -- the model zoo -------------------------------------------------------------------------


def _build(spec: CifarResNetSpec, branches: int, execution: str = "auto", **overrides) -> BranchBatchedCifarResNet:
    allowed = {"dropout", "zero_init_residual", "se_reduction"}
    unknown = set(overrides) - allowed
    if unknown:
        allowed_all = sorted(allowed | {"divide", "execution"})
        raise ValueError(f"unexpected keyword argument(s) {sorted(unknown)}; allowed: {allowed_all}")
    return BranchBatchedCifarResNet(replace(spec, **overrides), branches, execution=execution)


def wide_resnet_spec(depth: int, widen_factor: int, num_classes: int, branches: int, divide: bool = True):
    if (depth - 4) % 6:
        raise ValueError(f"Wide-ResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    k = divided_widen_factor(widen_factor, branches) if divide else widen_factor
    return CifarResNetSpec("basic", (n, n, n), 16, (16 * k, 32 * k, 64 * k), num_classes=num_classes)


def _register_wide_resnet(depth: int, widen_factor: int) -> None:
    name = f"wide_resnet{depth}_{widen_factor}"

    @register(name, family="cifar", default_num_classes=10, input_size=(3, 32, 32),
              description=f"WRN-{depth}-{widen_factor}; divided: k' = int(max(k/sqrt(S) + 0.4, 1))")
    def build(num_classes: int, branches: int = 1, divide: bool = True, **kw):
        return _build(wide_resnet_spec(depth, widen_factor, num_classes, branches, divide), branches, **kw)


# WRN-16-2 is not in the paper: a CPU-sized network for quick runs and the README's demo.
for _depth, _k in [(16, 2), (16, 4), (16, 8), (16, 12), (28, 10), (40, 10), (52, 8)]:
    _register_wide_resnet(_depth, _k)


def bottleneck_resnet_spec(depth: int, num_classes: int, branches: int, divide: bool = True, se: int = 0):
    if (depth - 2) % 9:
        raise ValueError(f"a CIFAR bottleneck ResNet's depth must be 9n+2, got {depth}")
    n = (depth - 2) // 9
    base = cifar_base_width(branches) if divide else 16
    return CifarResNetSpec("bottleneck", (n, n, n), base, (base, 2 * base, 4 * base), se_reduction=se,
                           num_classes=num_classes)


def _register_bottleneck_resnet(depth: int, se: bool) -> None:
    name = f"se_resnet{depth}" if se else f"resnet{depth}"

    @register(name, family="cifar", default_num_classes=10, input_size=(3, 32, 32),
              description=f"{'SE-' if se else ''}ResNet-{depth} (bottleneck); divided: base width 16/sqrt(S)")
    def build(num_classes: int, branches: int = 1, divide: bool = True, **kw):
        spec = bottleneck_resnet_spec(depth, num_classes, branches, divide, se=4 if se else 0)
        return _build(spec, branches, **kw)


for _depth in (110, 164):
    _register_bottleneck_resnet(_depth, se=False)
    _register_bottleneck_resnet(_depth, se=True)


def resnext29_spec(cardinality: int, width_per_group: int, num_classes: int, branches: int, divide: bool = True):
    groups = divided_groups(cardinality, branches) if divide else cardinality
    return CifarResNetSpec("bottleneck", (3, 3, 3), 64, (64, 128, 256), groups=groups,
                           width_per_group=width_per_group, num_classes=num_classes)


def _register_resnext29(cardinality: int, width_per_group: int) -> None:
    name = f"resnext29_{cardinality}x{width_per_group}d"

    @register(name, family="cifar", default_num_classes=10, input_size=(3, 32, 32),
              description=f"ResNeXt-29 {cardinality}x{width_per_group}d; divided: cardinality / S")
    def build(num_classes: int, branches: int = 1, divide: bool = True, **kw):
        return _build(resnext29_spec(cardinality, width_per_group, num_classes, branches, divide), branches, **kw)


for _c in (8, 16):
    _register_resnext29(_c, 64)
