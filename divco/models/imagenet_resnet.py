"""ImageNet ResNets whose branches ARE torchvision ResNets.

Every branch of :class:`BranchBatchedResNet` has exactly torchvision's module
structure and parameter names (``conv1, bn1, relu, maxpool, layer1..layer4,
avgpool, fc``; blocks with ``conv1/bn1/conv2/bn2[/conv3/bn3]/downsample.0/.1``), so
``divco.unstack`` returns real ``torchvision.models.ResNet`` instances (torchvision's
own forward) and ``divco.stack`` accepts them.

Dividing one network into S branches (``divide=True``, the official code's rules):

* plain ResNets (18/34/50/101/152): the stem and stage widths shrink to the base
  width ``{1: 64, 2: 44, 4: 32, 8: 24}[S]`` (other S: 64/sqrt(S) rounded to a
  multiple of 4, :func:`divco.models.dividing.imagenet_base_width`);
* ResNeXt: the cardinality is divided by S, ``width_per_group`` and widths stay;
* Wide-ResNet-50/101-k: see :func:`divided_wide_resnet_widths`.

A torchvision ``ResNet`` of divided widths cannot come from its constructor (which
fixes the stem and stage widths to 64, 128, 256, 512), so :func:`torchvision_resnet`
builds the instance the way the constructor does, with other widths: an empty
``ResNet`` (``ResNet.__new__`` + ``nn.Module.__init__``), the attributes that
torchvision's ``_make_layer`` reads (``inplanes, dilation, groups, base_width,
_norm_layer``), and the stages made by that ``_make_layer``.

torchvision is optional (``pip install "divco[vision]"``): the branch-batched networks do not
need it; only the conversions to and from torchvision ResNets (unstack, stack, export) import
it, when called, through :func:`torchvision_resnets`.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchvision.models import resnet as tv

from ..nn import BranchBatchNorm2d, BranchConv2d, BranchLinear
from ..nn.branching import active_branch_count
from ..nn.norm import norm_act
from .base import BranchBatchedNetwork, init_convolutions_and_batchnorms
from .dividing import divided_groups, divided_widen_factor, imagenet_base_width
from .registry import register
from .resnet_blocks import BLOCKS, zero_init_last_bns
from .standalone import register_standalone

_STAGE_STRIDES = (1, 2, 2, 2)


@dataclass(frozen=True)
class ResNetSpec:
    """One branch of an ImageNet ResNet (torchvision's architecture), completely."""

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]  # residual blocks per stage
    stem_width: int  # channels of the 7x7 stem convolution (torchvision: 64)
    widths: tuple[int, int, int, int]  # "planes" of each stage (torchvision: 64, 128, 256, 512)
    groups: int = 1  # cardinality of the 3x3 convolutions (ResNeXt)
    width_per_group: int = 64  # bottleneck width = int(planes * width_per_group / 64) * groups
    num_classes: int = 1000
    se_reduction: ClassVar[int] = 0  # the shared residual blocks' SE gate: none in torchvision's ResNets

    def __post_init__(self) -> None:
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.layers) != 4 or len(self.widths) != 4:
            raise ValueError(f"an ImageNet ResNet has 4 stages; got layers {self.layers} and widths {self.widths}")
        if min(self.layers) < 1 or min(self.widths) < 1 or self.stem_width < 1:
            raise ValueError(f"layers, widths and stem_width must be positive, got {self}")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError(
                f"a basic block supports only groups=1 and width_per_group=64 (as torchvision), "
                f"got groups={self.groups}, width_per_group={self.width_per_group}"
            )

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    def bottleneck_width(self, planes: int) -> int:
        return int(planes * (self.width_per_group / 64.0)) * self.groups


# -- the branch-batched network ----------------------------------------------------------------


def _downsample(inplanes: int, out: int, stride: int, branches: int) -> Optional[nn.Sequential]:
    """torchvision's projection shortcut: a strided 1x1 convolution and BN (the CIFAR ResNets and
    ResNet-D pool instead, :func:`divco.models.resnet_blocks.make_layer`)."""
    if stride == 1 and inplanes == out:
        return None
    return nn.Sequential(BranchConv2d(inplanes, out, 1, stride, branches=branches),
                         BranchBatchNorm2d(out, branches=branches))




class BranchBatchedResNet(BranchBatchedNetwork):
    """S torchvision-architecture ResNets (ResNet, ResNeXt, Wide-ResNet-50/101) as one module.

    ``zero_init_residual`` zero-initialises the last BN of every residual path, as
    torchvision's option of the same name.
    """

    family = "imagenet"

    def __init__(self, spec: ResNetSpec, branches: int = 1, *, execution: str = "auto",
                 zero_init_residual: bool = False) -> None:
        super().__init__(spec, branches, execution=execution)
        S = self.branches
        block = BLOCKS[spec.block]
        self.conv1 = BranchConv2d(3, spec.stem_width, 7, 2, 3, branches=S)
        self.bn1 = BranchBatchNorm2d(spec.stem_width, branches=S)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = spec.stem_width
        for i, (planes, blocks, stride) in enumerate(zip(spec.widths, spec.layers, _STAGE_STRIDES)):
            out = planes * block.expansion
            layers = [block(inplanes, planes, stride, _downsample(inplanes, out, stride, S), spec, S)]
            layers += [block(out, planes, 1, None, spec, S) for _ in range(1, blocks)]
            inplanes = out
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = BranchLinear(inplanes, spec.num_classes, branches=S)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        init_convolutions_and_batchnorms(self)  # torchvision's; the Linear keeps its default init
        if zero_init_residual:
            zero_init_last_bns(self)

    def forward_branches(self, x: Tensor) -> Tensor:
        x = self.maxpool(norm_act(self.bn1, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(x.view(x.shape[0], active_branch_count(self.branches), self.features))

    def standalone_model(self) -> tv.ResNet:
        """A fresh ``torchvision.models.ResNet`` with one branch's architecture."""
        return torchvision_resnet(self.spec)


# -- torchvision interoperability -----------------------------------------------------------

VISION_EXTRA_HINT = 'pip install "divco[vision]" (a torchvision built for your torch)'


def torchvision_resnets() -> ModuleType:
    """``torchvision.models.resnet``, imported on first use: torchvision is an optional extra."""
    try:
        return importlib.import_module("torchvision.models.resnet")
    except (ImportError, OSError, RuntimeError) as error:  # absent, or built for another torch
        raise ImportError(
            f"converting between divco and torchvision ResNets (stack, unstack, export of the ImageNet "
            f"family) needs torchvision, which is not installed or does not import ({error}): {VISION_EXTRA_HINT}"
        ) from error


def torchvision_resnet(spec: ResNetSpec) -> tv.ResNet:
    """A ``torchvision.models.ResNet`` of the architecture ``spec``, initialised as torchvision does.

    Built as torchvision's constructor builds it, but with the spec's stem and stage
    widths (the constructor hard-codes 64, 128, 256, 512): an empty ``ResNet``, the
    attributes ``_make_layer`` reads, and the stages made by ``_make_layer`` itself.
    """
    tv = torchvision_resnets()
    block = tv.Bottleneck if spec.block == "bottleneck" else tv.BasicBlock
    model = tv.ResNet.__new__(tv.ResNet)
    nn.Module.__init__(model)
    model._norm_layer = nn.BatchNorm2d
    model.inplanes = spec.stem_width
    model.dilation = 1
    model.groups = spec.groups
    model.base_width = spec.width_per_group
    model.conv1 = nn.Conv2d(3, spec.stem_width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(spec.stem_width)
    model.relu = nn.ReLU(inplace=True)
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    for i, (planes, blocks, stride) in enumerate(zip(spec.widths, spec.layers, _STAGE_STRIDES)):
        setattr(model, f"layer{i + 1}", model._make_layer(block, planes, blocks, stride=stride))
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.fc = nn.Linear(model.inplanes, spec.num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _structure(model: nn.Module) -> tuple[tuple[str, type, str], ...]:
    """(name, type, hyper-parameters) of every module: what decides the function computed."""
    # ReLU(inplace=...) computes the same function either way.
    return tuple((name, type(m), "" if isinstance(m, nn.ReLU) else m.extra_repr()) for name, m in model.named_modules())


@functools.lru_cache(maxsize=16)
def _torchvision_structure(spec: ResNetSpec) -> tuple[tuple[str, type, str], ...]:
    with torch.device("meta"):  # no memory; stacking S models of one spec builds it once
        return _structure(torchvision_resnet(spec))


def describe_torchvision_resnet(model: nn.Module) -> tuple[type, ResNetSpec]:
    """The spec of a ``torchvision.models.ResNet``, for :func:`divco.stack`.

    Accepts torchvision's ResNets of any widths, depths, groups, width_per_group and
    num_classes; rejects (ValueError) anything whose modules differ from what
    :func:`torchvision_resnet` builds for the inferred spec: subclasses, dilation,
    other norm layers, replaced stems or heads.
    """
    tv = torchvision_resnets()
    if type(model) is not tv.ResNet:
        raise ValueError(
            f"stack supports torchvision.models.ResNet itself, not the subclass {type(model).__qualname__} "
            f"(its forward may differ)"
        )
    try:
        first_blocks = [getattr(model, f"layer{i}")[0] for i in range(1, 5)]
        block_type = type(first_blocks[0])
        if block_type not in (tv.BasicBlock, tv.Bottleneck):
            raise ValueError(f"blocks must be torchvision BasicBlock or Bottleneck, got {block_type.__qualname__}")
        if block_type is tv.Bottleneck:
            widths = tuple(b.conv3.out_channels // tv.Bottleneck.expansion for b in first_blocks)
        else:
            widths = tuple(b.conv2.out_channels for b in first_blocks)
        spec = ResNetSpec(
            block="bottleneck" if block_type is tv.Bottleneck else "basic",
            layers=tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5)),
            stem_width=model.conv1.out_channels,
            widths=widths,
            groups=model.groups,
            width_per_group=model.base_width,
            num_classes=model.fc.out_features,
        )
    except (AttributeError, TypeError, IndexError, ValueError) as error:
        raise ValueError(f"stack cannot represent this torchvision ResNet: {error}") from None
    structure, reference = _structure(model), _torchvision_structure(spec)
    for got, expected in zip(structure, reference):
        if got != expected:
            raise ValueError(
                f"stack cannot represent this torchvision ResNet: module {got[0]!r} is "
                f"{got[1].__name__}({got[2]}), a branch of {spec} has {expected[0]!r} = "
                f"{expected[1].__name__}({expected[2]})"
            )
    n_got, n_expected = len(structure), len(reference)
    if n_got != n_expected:
        raise ValueError(
            f"stack cannot represent this torchvision ResNet: it has {n_got} modules, a branch of {spec} has "
            f"{n_expected}"
        )
    return BranchBatchedResNet, spec


# By name: stack recognises torchvision ResNets once torchvision is imported (it must be, to make one).
register_standalone("torchvision.models.resnet.ResNet", describe_torchvision_resnet)


# -- dividing rules and the model zoo --------------------------------------------------------------


def divided_wide_resnet_widths(widen_factor: int, branches: int) -> tuple[int, int]:
    """(base width, width_per_group) of one branch of a Wide-ResNet-50/101-k divided by S.

    The official code gives S=1: (64, 64k), S=2: (64, 64) and S=4: (32, 128) for
    k=2.  The rule behind both, used for every S: while the widen factor can absorb
    the division (sqrt(S) < k), divide it like the CIFAR Wide-ResNets,
    k' = int(max(k/sqrt(S) + 0.4, 1)), and keep the base width 64; once it cannot
    (sqrt(S) >= k), keep k and divide the base width like a plain ResNet
    (:func:`divco.models.dividing.imagenet_base_width`).
    """
    if math.sqrt(branches) < widen_factor:
        return 64, 64 * divided_widen_factor(widen_factor, branches)
    return imagenet_base_width(branches), 64 * widen_factor


def _plain_widths(base: int) -> tuple[int, int, int, int]:
    return (base, 2 * base, 4 * base, 8 * base)


def resnet_spec(block: str, layers: tuple[int, ...], num_classes: int, branches: int,
                divide: bool = True) -> ResNetSpec:
    """Plain ResNet: base width 64 divided by the paper's table."""
    base = imagenet_base_width(branches) if divide else 64
    return ResNetSpec(block, tuple(layers), base, _plain_widths(base), num_classes=num_classes)


def resnext_spec(layers: tuple[int, ...], groups: int, width_per_group: int, num_classes: int, branches: int,
                 divide: bool = True) -> ResNetSpec:
    """ResNeXt: cardinality divided by S; widths and width_per_group kept."""
    g = divided_groups(groups, branches) if divide else groups
    return ResNetSpec("bottleneck", tuple(layers), 64, _plain_widths(64), groups=g,
                      width_per_group=width_per_group, num_classes=num_classes)


def wide_resnet_spec(layers: tuple[int, ...], widen_factor: int, num_classes: int, branches: int,
                     divide: bool = True) -> ResNetSpec:
    """Wide-ResNet-50/101-k: see :func:`divided_wide_resnet_widths`."""
    base, width_per_group = divided_wide_resnet_widths(widen_factor, branches) if divide else (64, 64 * widen_factor)
    return ResNetSpec("bottleneck", tuple(layers), base, _plain_widths(base), width_per_group=width_per_group,
                      num_classes=num_classes)


def _register(name: str, description: str, make_spec, max_branches: int = 0) -> None:
    @register(name, family="imagenet", default_num_classes=1000, input_size=(3, 224, 224), description=description,
              max_branches=max_branches)
    def build(num_classes: int, branches: int = 1, divide: bool = True, execution: str = "auto",
              zero_init_residual: bool = False) -> BranchBatchedResNet:
        spec = make_spec(num_classes, branches, divide)
        return BranchBatchedResNet(spec, branches, execution=execution, zero_init_residual=zero_init_residual)


# Every name is spelled out (grep finds it).
#: name: (block, blocks per stage) of torchvision's plain ResNets.
RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

#: name: (blocks per stage, cardinality, width per group) of torchvision's ResNeXts.
RESNEXTS: dict[str, tuple[tuple[int, int, int, int], int, int]] = {
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ((3, 4, 23, 3), 64, 4),
}

#: name: (blocks per stage, widen factor) of torchvision's Wide-ResNets.
WIDE_RESNETS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "wide_resnet50_2": ((3, 4, 6, 3), 2),
    "wide_resnet101_2": ((3, 4, 23, 3), 2),
}

for _name, (_block, _layers) in RESNETS.items():
    _register(_name, f"{_name} (torchvision layout); divided: base width 64 -> 44/32/24 for S=2/4/8",
              lambda nc, S, divide, b=_block, ly=_layers: resnet_spec(b, ly, nc, S, divide))

for _name, (_layers, _groups, _wpg) in RESNEXTS.items():
    _register(_name, f"{_name} (torchvision layout); divided: cardinality / S",
              lambda nc, S, divide, ly=_layers, g=_groups, w=_wpg: resnext_spec(ly, g, w, nc, S, divide),
              max_branches=_groups)

for _name, (_layers, _k) in WIDE_RESNETS.items():
    _register(_name, f"{_name} (torchvision layout); divided: k' = int(max(k/sqrt(S) + 0.4, 1)) at base "
              f"width 64 while sqrt(S) < k (S=2, 3: k'=1), then k kept and base width 64 -> 32/24 for S=4/8",
              lambda nc, S, divide, ly=_layers, k=_k: wide_resnet_spec(ly, k, nc, S, divide))
