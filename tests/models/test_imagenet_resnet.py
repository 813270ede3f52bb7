"""ImageNet ResNets: every branch is exactly a torchvision ResNet; the official dividing rules."""

from __future__ import annotations

import math

import pytest
import torch

torchvision = pytest.importorskip("torchvision", reason="torchvision is optional (divco[vision])")
from model_matrix import assert_close, shapes_only
from torch import nn
from torchvision.models import resnet as tv

import divco
from divco.models.imagenet_resnet import (
    BranchBatchedResNet,
    ResNetSpec,
    divided_wide_resnet_widths,
    resnet_spec,
    resnext_spec,
    torchvision_resnet,
    wide_resnet_spec,
)
from divco.nn import BranchConv2d

IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                   "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"]


def test_the_imagenet_family_is_registered():
    from divco.models.imagenet_resnet_d import RESNET_D_NETWORKS

    assert divco.models.list("imagenet") == sorted(IMAGENET_MODELS + list(RESNET_D_NETWORKS))


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_one_branch_is_exactly_torchvisions_model(name):
    with shapes_only():
        ours = divco.models.create(name)
        theirs = getattr(torchvision.models, name)()
        rebuilt = ours.standalone_model()
    # the same modules under the same names, the same tensors (names and shapes), the same count
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    # standalone_model() builds torchvision's module tree (types and hyper-parameters) for the spec
    assert type(rebuilt) is tv.ResNet
    assert repr(rebuilt) == repr(theirs)


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_registered_models_run_divided(name):
    """Shapes through the whole network, divided by a branch count outside the official tables."""
    with shapes_only("cpu"), torch.no_grad():
        model = divco.models.create(name, num_classes=7, branches=3, execution="batched").eval()
        assert model(torch.zeros(2, 3, 3, 32, 32)).shape == (2, 3, 7)


def test_standalone_model_with_divided_widths_is_a_working_torchvision_resnet():
    model = divco.models.create("resnet18", num_classes=3, branches=2)  # base width 44
    standalone = model.standalone_model()
    assert isinstance(standalone, torchvision.models.ResNet)
    assert standalone.conv1.out_channels == 44 and standalone.fc.in_features == 352
    assert standalone(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert type(standalone).forward is tv.ResNet.forward  # torchvision's own forward, not a copy


# -- dividing rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("S, base", [(1, 64), (2, 44), (3, 36), (4, 32), (8, 24)])
def test_plain_resnets_divide_the_base_width(S, base):
    spec = resnet_spec("bottleneck", (3, 4, 6, 3), 1000, S)
    assert spec.stem_width == base and spec.widths == (base, 2 * base, 4 * base, 8 * base)
    assert (spec.groups, spec.width_per_group) == (1, 64)
    assert resnet_spec("bottleneck", (3, 4, 6, 3), 1000, S, divide=False) == resnet_spec(
        "bottleneck", (3, 4, 6, 3), 1000, 1)


@pytest.mark.parametrize("S, groups", [(1, 32), (2, 16), (3, 10), (4, 8)])
def test_resnext_divides_the_cardinality(S, groups):
    spec = resnext_spec((3, 4, 6, 3), 32, 4, 1000, S)
    assert (spec.groups, spec.width_per_group, spec.stem_width, spec.widths) == (groups, 4, 64, (64, 128, 256, 512))
    assert resnext_spec((3, 4, 6, 3), 32, 4, 1000, S, divide=False).groups == 32


@pytest.mark.parametrize("S, base, width_per_group", [(1, 64, 128), (2, 64, 64), (3, 64, 64), (4, 32, 128),
                                                      (8, 24, 128)])
def test_wide_resnet_follows_the_official_rule(S, base, width_per_group):
    """Official: S=2 -> (64, 64), S=4 -> (32, 128); other S by the documented rule."""
    assert divided_wide_resnet_widths(2, S) == (base, width_per_group)
    spec = wide_resnet_spec((3, 4, 6, 3), 2, 1000, S)
    assert (spec.stem_width, spec.widths[0], spec.width_per_group) == (base, base, width_per_group)
    assert wide_resnet_spec((3, 4, 6, 3), 2, 1000, S, divide=False) == wide_resnet_spec((3, 4, 6, 3), 2, 1000, 1)


@pytest.mark.parametrize("name, S, millions", [
    ("resnet50", 2, 25.07), ("resnet50", 4, 27.67), ("resnext50_32x4d", 2, 29.89),
    ("wide_resnet50_2", 2, 51.11), ("wide_resnet50_2", 4, 71.01), ("resnet18", 4, 12.22),
])
def test_divided_parameter_counts(name, S, millions):
    with shapes_only():
        model = divco.models.create(name, branches=S)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)


def test_divide_false_gives_full_size_branches():
    with shapes_only():
        one = divco.models.create("resnet50")
        four = divco.models.create("resnet50", branches=4, divide=False)
    assert four.spec == one.spec
    assert sum(p.numel() for p in four.parameters()) == 4 * sum(p.numel() for p in one.parameters())


# -- initialisation ----------------------------------------------------------------------------------


def test_initialisation_is_torchvisions_per_branch():
    torch.manual_seed(0)
    model = BranchBatchedResNet(resnet_spec("basic", (1, 1, 1, 1), 10, 3), 3)
    conv = model.layer3[0].conv1  # 3x3, 36*2 -> 36*4 channels per branch
    fan_out = conv.out_channels * 9
    for s in range(3):
        assert conv.branch_weight(s).std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.1)
    assert torch.equal(model.layer1[0].bn2.weight, torch.ones(3 * 36))  # not zero-initialised by default
    assert torch.equal(model.bn1.bias, torch.zeros(3 * 36))
    for m in model.modules():
        if isinstance(m, BranchConv2d):
            assert m.bias is None


def test_zero_init_residual_zeroes_the_last_bn_of_every_residual_path():
    basic = divco.models.create("resnet18", num_classes=10, branches=2, zero_init_residual=True)
    assert all(not b.bn2.weight.any() and b.bn1.weight.all() for layer in
               (basic.layer1, basic.layer2, basic.layer3, basic.layer4) for b in layer)
    bottleneck = BranchBatchedResNet(resnet_spec("bottleneck", (1, 1, 1, 1), 10, 2), 2, zero_init_residual=True)
    assert all(not b.bn3.weight.any() and b.bn2.weight.all() for layer in
               (bottleneck.layer1, bottleneck.layer2, bottleneck.layer3, bottleneck.layer4) for b in layer)


# -- torchvision interoperability and bad input ----------------------------------------------------------


def test_torchvision_resnet_equals_torchvisions_constructor_for_its_widths():
    """The __new__ + _make_layer build gives torchvision's own module tree, layer by layer."""
    spec = ResNetSpec("bottleneck", (1, 2, 1, 1), 64, (64, 128, 256, 512), groups=4, width_per_group=16,
                      num_classes=5)
    torch.manual_seed(0)
    ours = torchvision_resnet(spec)
    theirs = tv.ResNet(tv.Bottleneck, [1, 2, 1, 1], num_classes=5, groups=4, width_per_group=16)
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x), theirs(x), 0.0, "logits")


def test_bad_spec_raises():
    with pytest.raises(ValueError, match="block must be 'basic' or 'bottleneck', got 'dense'"):
        ResNetSpec("dense", (1, 1, 1, 1), 64, (64, 128, 256, 512))
    with pytest.raises(ValueError, match="an ImageNet ResNet has 4 stages"):
        ResNetSpec("basic", (1, 1, 1), 64, (64, 128, 256))
    with pytest.raises(ValueError, match=r"basic block supports only groups=1 and width_per_group=64 .*groups=2"):
        ResNetSpec("basic", (1, 1, 1, 1), 64, (64, 128, 256, 512), groups=2)
    with pytest.raises(ValueError, match=r"unexpected keyword argument\(s\) \['dropout'\] for model 'resnet50'; it takes: divide, execution, zero_init_residual"):
        divco.models.create("resnet50", dropout=0.2)


def test_forward_shapes_and_features():
    model = BranchBatchedResNet(resnet_spec("basic", (1, 1, 1, 1), 4, 2), 2)
    assert model.features == 352
    with pytest.raises(ValueError, match="expects 3 input channels"):
        model(torch.randn(1, 1, 32, 32))
    assert isinstance(model.standalone_model().fc, nn.Linear)
