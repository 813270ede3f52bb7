"""The official ImageNet ResNet-D networks: architecture, dividing rule and the paper's parameter counts."""

from __future__ import annotations

import pytest
import torch
from model_matrix import shapes_only

import divco
from divco.models.imagenet_resnet_d import RESNET_D_NETWORKS, BranchBatchedResNetD, ResNetDSpec
from divco.nn import BranchBatchNorm2d


def _millions(name: str, S: int) -> float:
    with shapes_only():
        model = divco.models.create(name, branches=S)
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name, S, paper", [
    # Zhao et al., TIP 2022, Table IV (1000 classes, all branches together)
    ("wide_resnet50_2_d", 1, 68.9), ("wide_resnet50_2_d", 2, 51.4),
    ("wide_resnet50_3_d", 1, 135.0), ("wide_resnet50_3_d", 2, 138.0),
    ("resnext101_64x4d_d", 1, 83.6), ("resnext101_64x4d_d", 2, 88.6),
])
def test_parameter_counts_reproduce_the_paper(name, S, paper):
    assert _millions(name, S) == pytest.approx(paper, abs=0.15)


@pytest.mark.parametrize("name, counts", [
    # divco's counts at S = 1, 2, 4 (the paper reports no other ImageNet S; these pin the rule)
    ("resnet50_d", (25.7, 25.2, 27.8)), ("resnet101_d", (44.7, 43.2, 46.8)),
    ("wide_resnet50_2_d", (69.0, 51.4, 71.1)), ("wide_resnet101_2_d", (127.0, 121.0, 129.2)),
    ("resnext101_64x4d_d", (83.6, 88.6, 98.7)),
])
def test_parameter_counts_at_s_1_2_4(name, counts):
    assert tuple(round(_millions(name, S), 1) for S in (1, 2, 4)) == counts


def test_wrn101_2_is_divided_by_the_official_rule_not_like_wrn50_2():
    """The official code special-cases only WRN-50-2/50-3 at S=2: WRN-101-2 keeps width per group 128."""
    with shapes_only():
        w50 = divco.models.create("wide_resnet50_2_d", branches=2).spec
        w101 = divco.models.create("wide_resnet101_2_d", branches=2).spec
        w50_4 = divco.models.create("wide_resnet50_2_d", branches=4).spec
    assert (w50.base_width, w50.width_per_group) == (64, 64)
    assert (w101.base_width, w101.width_per_group) == (44, 128)
    assert (w50_4.base_width, w50_4.width_per_group) == (32, 128)
    with shapes_only():
        assert divco.models.create("resnext101_64x4d_d", branches=4).spec.groups == 16


def test_architecture_is_resnet_d():
    with shapes_only():
        model = divco.models.create("resnet50_d", branches=2)
    stem = [m for m in model.layer0 if isinstance(m, torch.nn.Module)]
    convs = [m for m in stem if type(m).__name__ == "BranchConv2d"]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 44, (3, 3), (2, 2)), (44, 44, (3, 3), (1, 1)), (44, 88, (3, 3), (1, 1))]
    assert isinstance(model.layer0[-1], torch.nn.MaxPool2d)
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], torch.nn.AvgPool2d) and shortcut[1].stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3 convolution
    assert model.layer1[0].conv1.in_channels == 88  # the stem ends with twice the base width


def test_init_zeroes_the_last_bn_and_resnet101_has_dropout_over_s():
    model = divco.models.create("resnet50_d", num_classes=10, branches=2)
    for block in model.layer1:
        assert torch.all(block.bn3.weight == 0)
    assert torch.all(model.layer0[1].weight == 1) and model.dropout is None
    assert model.fc.weight.std().item() == pytest.approx(1e-3, rel=0.2)
    with shapes_only():
        assert divco.models.create("resnet101_d", branches=1).dropout.p == pytest.approx(0.1)
        assert divco.models.create("resnet101_d", branches=4).dropout.p == pytest.approx(0.025)
        assert divco.models.create("resnet50_d", branches=2, zero_init_residual=False).spec.zero_init_residual is False


@pytest.mark.parametrize("S", [1, 2, 4])
def test_forward_shapes(S):
    with shapes_only("cpu"), torch.no_grad():
        model = divco.models.create("resnet50_d", num_classes=7, branches=S, execution="batched").eval()
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, S, 7)
        assert model(torch.zeros(2, S, 3, 64, 64)).shape == (2, S, 7)


def test_small_resnet_d_is_per_branch_equal_to_batched():
    spec = ResNetDSpec("bottleneck", (1, 1, 1, 1), 8, num_classes=5, zero_init_residual=False, dropout=0.0)
    torch.manual_seed(0)
    model = BranchBatchedResNetD(spec, 2).eval()
    for m in model.modules():
        if isinstance(m, BranchBatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(2, 2, 3, 40, 40)
    model.execution = "batched"
    batched = model(x)
    model.execution = "per_branch"
    torch.testing.assert_close(model(x), batched, rtol=1e-4, atol=1e-5)


def test_every_official_network_is_registered_under_its_own_name():
    names = set(divco.models.list("imagenet"))
    assert set(RESNET_D_NETWORKS) <= names
    assert {"resnet50", "wide_resnet101_2"} <= names  # the torchvision layout stays


def test_the_module_does_not_import_torchvision():
    import divco.models.imagenet_resnet_d as module

    assert "torchvision" not in open(module.__file__).read().split('"""', 2)[2]
