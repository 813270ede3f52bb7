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
from .resnet_blocks import BLOCKS, BasicBlock, Bottleneck, SqueezeExcitation, make_layer, zero_init_last_bns  # noqa: F401
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


class BranchBatchedCifarResNet(BranchBatchedNetwork):
    """S CIFAR ResNets (WRN, ResNet-110/164, SE-ResNet, ResNeXt-29) as one module."""

    family = "cifar"

    def __init__(self, spec: CifarResNetSpec, branches: int = 1, *, execution: str = "auto") -> None:
        super().__init__(spec, branches, execution=execution)
        S = branches
        block = BLOCKS[spec.block]
        self.conv1 = BranchConv2d(3, spec.stem_width, 3, 1, 1, branches=S)
        self.bn1 = BranchBatchNorm2d(spec.stem_width, branches=S)
        self.relu = nn.ReLU(inplace=True)
        inplanes = spec.stem_width
        for i, (planes, blocks) in enumerate(zip(spec.widths, spec.layers)):
            stride = 1 if i == 0 else 2
            layer, inplanes = make_layer(block, inplanes, planes, blocks, stride, spec, S)
            self.add_module(f"layer{i + 1}", layer)
        self.num_stages = len(spec.layers)
        self.features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.fc = BranchLinear(inplanes, spec.num_classes, branches=S)
        self._init_weights()

    def _init_weights(self) -> None:
        init_convolutions_and_batchnorms(self)
        for m in self.modules():
            if isinstance(m, BranchLinear):
                nn.init.normal_(m.weight, std=1e-3)
                nn.init.zeros_(m.bias)
        if self.spec.zero_init_residual:
            zero_init_last_bns(self)

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
# Every name is spelled out below (grep finds it); ``divco.models.create`` checks the keyword
# arguments against each builder's signature, so the builders declare every option they take.


def _build(spec: CifarResNetSpec, branches: int, execution: str, dropout: Optional[float],
           zero_init_residual: Optional[bool], se_reduction: Optional[int]) -> BranchBatchedCifarResNet:
    """The network of ``spec``; a non-None option replaces the architecture's own value."""
    overrides = {k: v for k, v in (("dropout", dropout), ("zero_init_residual", zero_init_residual),
                                   ("se_reduction", se_reduction)) if v is not None}
    return BranchBatchedCifarResNet(replace(spec, **overrides), branches, execution=execution)


#: name: (depth, widen factor, dropout before the classifier of the undivided network).
#: The official code puts Dropout(0.1 / S) before WRN-40-10's classifier, and none elsewhere.
#: WRN-16-1, WRN-16-2 and WRN-16-4 are not in the paper: CPU-sized networks for quick runs and the
#: demo, and the smallest widths of Kondratyuk et al.'s ensemble curve. WRN-16-1 cannot
#: be made narrower: divided, every branch keeps k' = 1 (an ensemble of S full WRN-16-1s).
WIDE_RESNETS: dict[str, tuple[int, int, float]] = {
    "wide_resnet16_1": (16, 1, 0.0),
    "wide_resnet16_2": (16, 2, 0.0),
    "wide_resnet16_4": (16, 4, 0.0),
    "wide_resnet16_8": (16, 8, 0.0),
    "wide_resnet16_12": (16, 12, 0.0),
    "wide_resnet28_10": (28, 10, 0.0),
    "wide_resnet40_10": (40, 10, 0.1),
    "wide_resnet52_8": (52, 8, 0.0),
}


def wide_resnet_spec(depth: int, widen_factor: int, num_classes: int, branches: int, divide: bool = True,
                     dropout: float = 0.0):
    """WRN-depth-k; divided: k' = int(max(k/sqrt(S) + 0.4, 1)) and dropout p / S (official)."""
    if (depth - 4) % 6:
        raise ValueError(f"Wide-ResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    k = divided_widen_factor(widen_factor, branches) if divide else widen_factor
    p = dropout / branches if divide else dropout
    return CifarResNetSpec("basic", (n, n, n), 16, (16 * k, 32 * k, 64 * k), dropout=p, num_classes=num_classes)


def _register_wide_resnet(name: str, depth: int, widen_factor: int, dropout: float) -> None:
    extra = f"; Dropout({dropout}/S) before the classifier" if dropout else ""

    @register(name, family="cifar", default_num_classes=10, input_size=(3, 32, 32),
              description=f"WRN-{depth}-{widen_factor}; divided: k' = int(max(k/sqrt(S) + 0.4, 1)){extra}")
    def build(num_classes: int, branches: int = 1, divide: bool = True, execution: str = "auto",
              dropout: Optional[float] = None, zero_init_residual: Optional[bool] = None,
              se_reduction: Optional[int] = None) -> BranchBatchedCifarResNet:
        spec = wide_resnet_spec(depth, widen_factor, num_classes, branches, divide, WIDE_RESNETS[name][2])
        return _build(spec, branches, execution, dropout, zero_init_residual, se_reduction)


for _name, (_depth, _k, _dropout) in WIDE_RESNETS.items():
    _register_wide_resnet(_name, _depth, _k, _dropout)


#: name: (depth, squeeze-and-excitation reduction; 0 = none).
BOTTLENECK_RESNETS: dict[str, tuple[int, int]] = {
    "resnet110": (110, 0),
    "resnet164": (164, 0),
    "se_resnet110": (110, 4),
    "se_resnet164": (164, 4),
}


def bottleneck_resnet_spec(depth: int, num_classes: int, branches: int, divide: bool = True, se: int = 0):
    """ResNet-110/164 (bottleneck) and their SE variants.

    The official SE-ResNets do not zero-initialise the last BN of a residual path (their
    constructor ignores ``zero_init_residual``); the plain ones do.
    """
    if (depth - 2) % 9:
        raise ValueError(f"a CIFAR bottleneck ResNet's depth must be 9n+2, got {depth}")
    n = (depth - 2) // 9
    base = cifar_base_width(branches) if divide else 16
    return CifarResNetSpec("bottleneck", (n, n, n), base, (base, 2 * base, 4 * base), se_reduction=se,
                           num_classes=num_classes, zero_init_residual=not se)


def _register_bottleneck_resnet(name: str, depth: int, se: int) -> None:
    @register(name, family="cifar", default_num_classes=10, input_size=(3, 32, 32),
              description=f"{'SE-' if se else ''}ResNet-{depth} (bottleneck); divided: base width 16/sqrt(S)")
    def build(num_classes: int, branches: int = 1, divide: bool = True, execution: str = "auto",
              dropout: Optional[float] = None, zero_init_residual: Optional[bool] = None,
              se_reduction: Optional[int] = None) -> BranchBatchedCifarResNet:
        spec = bottleneck_resnet_spec(depth, num_classes, branches, divide, se=se)
        return _build(spec, branches, execution, dropout, zero_init_residual, se_reduction)


for _name, (_depth, _se) in BOTTLENECK_RESNETS.items():
    _register_bottleneck_resnet(_name, _depth, _se)


#: name: (cardinality, width per group).
RESNEXT29S: dict[str, tuple[int, int]] = {
    "resnext29_8x64d": (8, 64),
    "resnext29_16x64d": (16, 64),
}


def resnext29_spec(cardinality: int, width_per_group: int, num_classes: int, branches: int, divide: bool = True):
    groups = divided_groups(cardinality, branches) if divide else cardinality
    return CifarResNetSpec("bottleneck", (3, 3, 3), 64, (64, 128, 256), groups=groups,
                           width_per_group=width_per_group, num_classes=num_classes)


def _register_resnext29(name: str, cardinality: int, width_per_group: int) -> None:
    @register(name, family="cifar", default_num_classes=10, input_size=(3, 32, 32),
              description=f"ResNeXt-29 {cardinality}x{width_per_group}d; divided: cardinality / S",
              max_branches=cardinality)
    def build(num_classes: int, branches: int = 1, divide: bool = True, execution: str = "auto",
              dropout: Optional[float] = None, zero_init_residual: Optional[bool] = None,
              se_reduction: Optional[int] = None) -> BranchBatchedCifarResNet:
        spec = resnext29_spec(cardinality, width_per_group, num_classes, branches, divide)
        return _build(spec, branches, execution, dropout, zero_init_residual, se_reduction)


for _name, (_cardinality, _width) in RESNEXT29S.items():
    _register_resnext29(_name, _cardinality, _width)
