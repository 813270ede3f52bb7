"""The official code's ImageNet networks: ResNet-D variants, torchvision-free.

The networks that produced the paper's ImageNet table (Zhao et al., TIP 2022, Table IV)
are not torchvision's ResNets (those stay registered under their torchvision names, for
stack/unstack with torchvision).  Each branch here is the official ``ResNet`` built for
``dataset='imagenet'``:

* a deep stem ``layer0``: 3x3 conv (stride 2) -> BN -> ReLU -> 3x3 conv -> BN -> ReLU ->
  3x3 conv to twice the base width -> BN -> ReLU -> 3x3 max pooling (stride 2);
* four stages of torchvision's blocks (stride on the 3x3 convolution) whose first stage
  takes ``2 * base`` channels; where a stage downsamples, the shortcut is 2x2 average
  pooling then a 1x1 convolution and BN (ResNet-D);
* zero-initialised last BN of every residual path, He-normal convolutions, N(0, 1e-3)
  classifier weights;
* Dropout(0.1 / S) before the classifier of ResNet-101 (no dropout elsewhere).

Dividing into S branches, as the official code does it: plain ResNets and Wide-ResNets
take the base width ``{1: 64, 2: 44, 4: 32, 8: 24}[S]`` and keep their width per group;
the only special cases are WRN-50-2 and WRN-50-3 at S=2 (base 64, width per group 64
and 128); ResNeXts divide their cardinality by S.  So WRN-101-2 at S=2 has base 44 and
width per group 128 (about 121M parameters), unlike divco's torchvision-layout
``wide_resnet101_2``.  S outside the official tables uses 64/sqrt(S) rounded to a
multiple of 4 (a divco extension).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from torch import Tensor, nn

from ..nn import BranchBatchNorm2d, BranchConv2d, BranchLinear
from ..nn.branching import active_branch_count
from .base import BranchBatchedNetwork, init_convolutions_and_batchnorms
from .dividing import divided_groups, imagenet_base_width
from .registry import register
from .resnet_blocks import BLOCKS, make_layer, zero_init_last_bns

_STAGE_STRIDES = (1, 2, 2, 2)


@dataclass(frozen=True)
class ResNetDSpec:
    """One branch of an official ImageNet ResNet-D, completely."""

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]  # residual blocks per stage
    base_width: int  # the stem's first width; stage i has "planes" base * 2**i; the stem ends with 2 * base
    groups: int = 1  # cardinality of the 3x3 convolutions (ResNeXt)
    width_per_group: int = 64  # bottleneck width = int(planes * width_per_group / 64) * groups
    dropout: float = 0.0  # dropout before the classifier
    num_classes: int = 1000
    zero_init_residual: bool = True
    se_reduction: int = 0  # read by the shared blocks; the official ResNet-D has no SE

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"an ImageNet ResNet-D has 4 stages of >= 1 block; got layers {self.layers}")
        if self.base_width < 1 or self.groups < 1 or self.width_per_group < 1:
            raise ValueError(f"base_width, groups and width_per_group must be positive, got {self}")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("a basic block supports only groups=1 and width_per_group=64")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")


def _conv_bn_relu(c_in: int, c_out: int, stride: int, branches: int) -> list[nn.Module]:
    return [BranchConv2d(c_in, c_out, 3, stride, 1, branches=branches), BranchBatchNorm2d(c_out, branches=branches),
            nn.ReLU(inplace=True)]


class BranchBatchedResNetD(BranchBatchedNetwork):
    """S official ImageNet ResNet-D networks (ResNet, ResNeXt, Wide-ResNet) as one module.

    Module names follow the official ``ResNet`` (``layer0`` .. ``layer4``, ``avgpool``,
    ``dropout``, ``fc``), so a branch's state dict has the official keys.
    """

    family = "imagenet"

    def __init__(self, spec: ResNetDSpec, branches: int = 1, *, execution: str = "auto") -> None:
        super().__init__(spec, branches, execution=execution)
        S = self.branches
        w = spec.base_width
        self.layer0 = nn.Sequential(*_conv_bn_relu(3, w, 2, S), *_conv_bn_relu(w, w, 1, S),
                                    *_conv_bn_relu(w, 2 * w, 1, S), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        block = BLOCKS[spec.block]
        inplanes = 2 * w
        for i, (blocks, stride) in enumerate(zip(spec.layers, _STAGE_STRIDES)):
            layer, inplanes = make_layer(block, inplanes, w * 2**i, blocks, stride, spec, S)
            self.add_module(f"layer{i + 1}", layer)
        self.features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout: Optional[nn.Module] = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.fc = BranchLinear(inplanes, spec.num_classes, branches=S)
        self._init_weights()

    def _init_weights(self) -> None:
        init_convolutions_and_batchnorms(self)
        nn.init.normal_(self.fc.weight, std=1e-3)
        nn.init.zeros_(self.fc.bias)
        if self.spec.zero_init_residual:
            zero_init_last_bns(self)

    def forward_branches(self, x: Tensor) -> Tensor:
        x = self.layer0(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        x = x.view(x.shape[0], active_branch_count(self.branches), self.features)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


# -- the official dividing rule and the model zoo ------------------------------------------------


def resnet_d_spec(block: str, layers: tuple[int, int, int, int], num_classes: int, branches: int,
                  divide: bool = True, *, groups: int = 1, width_per_group: int = 64, dropout: float = 0.0,
                  name: str = "") -> ResNetDSpec:
    """One branch of the official network ``name`` divided into ``branches`` (the official rule)."""
    S = branches if divide else 1
    if groups > 1:  # ResNeXt: cardinality / S, base width 64
        return ResNetDSpec(block, layers, 64, divided_groups(groups, S), width_per_group, dropout / S,
                           num_classes)
    base = imagenet_base_width(S)
    if S == 2 and name in _S2_WIDE_RESNET_WIDTHS:  # the official code's only special cases
        base, width_per_group = _S2_WIDE_RESNET_WIDTHS[name]
    return ResNetDSpec(block, layers, base, 1, width_per_group, dropout / S, num_classes)


#: (base width, width per group) of WRN-50-2 and WRN-50-3 divided into S=2 (official).
_S2_WIDE_RESNET_WIDTHS = {"wide_resnet50_2_d": (64, 64), "wide_resnet50_3_d": (64, 128)}

#: name: (block, blocks per stage, cardinality, width per group, dropout of the undivided network).
#: Every name is spelled out (grep finds it).
RESNET_D_NETWORKS: dict[str, tuple[str, tuple[int, int, int, int], int, int, float]] = {
    "resnet50_d": ("bottleneck", (3, 4, 6, 3), 1, 64, 0.0),
    "resnet101_d": ("bottleneck", (3, 4, 23, 3), 1, 64, 0.1),
    "resnet152_d": ("bottleneck", (3, 8, 36, 3), 1, 64, 0.0),
    "resnet200_d": ("bottleneck", (3, 24, 36, 3), 1, 64, 0.0),
    "wide_resnet50_2_d": ("bottleneck", (3, 4, 6, 3), 1, 128, 0.0),
    "wide_resnet50_3_d": ("bottleneck", (3, 4, 6, 3), 1, 192, 0.0),
    "wide_resnet101_2_d": ("bottleneck", (3, 4, 23, 3), 1, 128, 0.0),
    "resnext50_32x4d_d": ("bottleneck", (3, 4, 6, 3), 32, 4, 0.0),
    "resnext101_32x4d_d": ("bottleneck", (3, 4, 23, 3), 32, 4, 0.0),
    "resnext101_64x4d_d": ("bottleneck", (3, 4, 23, 3), 64, 4, 0.0),
}


def _register_resnet_d(name: str) -> None:
    block, layers, groups, width_per_group, official_dropout = RESNET_D_NETWORKS[name]
    rule = "cardinality / S" if groups > 1 else "base width 64 -> 44/32/24 for S=2/4/8"
    if name in _S2_WIDE_RESNET_WIDTHS:  # the official special case, as resnet_d_spec applies it
        rule += (f", except S=2: base width {_S2_WIDE_RESNET_WIDTHS[name][0]}, width per group "
                 f"{_S2_WIDE_RESNET_WIDTHS[name][1]}")
    extra = f"; Dropout({official_dropout}/S) before fc" if official_dropout else ""

    @register(name, family="imagenet", default_num_classes=1000, input_size=(3, 224, 224),
              description=f"{name}: the official ImageNet ResNet-D (deep stem, avg-pool shortcut); divided: "
                          f"{rule}{extra}",
              max_branches=groups if groups > 1 else 0)
    def build(num_classes: int, branches: int = 1, divide: bool = True, execution: str = "auto",
              dropout: Optional[float] = None, zero_init_residual: bool = True) -> BranchBatchedResNetD:
        """``dropout``/``zero_init_residual``: replace the official values (None keeps them)."""
        spec = resnet_d_spec(block, layers, num_classes, branches, divide, groups=groups,
                             width_per_group=width_per_group, dropout=official_dropout, name=name)
        spec = replace(spec, dropout=spec.dropout if dropout is None else dropout,
                       zero_init_residual=zero_init_residual)
        return BranchBatchedResNetD(spec, branches, execution=execution)


for _name in RESNET_D_NETWORKS:
    _register_resnet_d(_name)
