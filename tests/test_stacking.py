"""divco.stack / divco.unstack: exact round trips, torchvision ResNets, and clear refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision", reason="torchvision is optional (divco[vision])")
from torchvision.models import resnet as tv  # noqa: E402

import divco  # noqa: E402
from divco.models.base import BranchBatchedNetwork
from divco.models.imagenet_resnet import BranchBatchedResNet, describe_torchvision_resnet

sys.path.insert(0, str(Path(__file__).parent / "models"))
from model_matrix import FAMILIES, assert_close, branch_logits, build, randomize_


def _mixed_training_flags(model: nn.Module) -> None:
    """Train mode with some modules in eval mode (e.g. frozen BN), as users do."""
    model.train()
    for i, m in enumerate(model.modules()):
        if i % 3 == 1:
            m.eval()


@pytest.mark.parametrize("S", [1, 2, 3, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_stack_of_unstack_is_the_identity(family, S):
    model, _ = build(family, S)
    _mixed_training_flags(model)
    parts = divco.unstack(model)
    assert len(parts) == S
    if isinstance(model, BranchBatchedResNet):
        assert all(type(p) is tv.ResNet for p in parts)
    else:
        assert all(type(p) is type(model) and p.branches == 1 for p in parts)
    again = divco.stack(parts, execution=model.execution)
    assert type(again) is type(model) and again.spec == model.spec and again.branches == S
    original, rebuilt = model.state_dict(), again.state_dict()
    assert list(original) == list(rebuilt)
    for key, value in original.items():
        assert rebuilt[key].dtype == value.dtype and torch.equal(rebuilt[key], value), key
    assert {n: m.training for n, m in again.named_modules()} == {n: m.training for n, m in model.named_modules()}


def test_unstack_copies_and_branch_state_dict_slices():
    model, _ = build("imagenet_basic", 3)
    parts = divco.unstack(model)
    for s, part in enumerate(parts):
        state = divco.branch_state_dict(model, s)
        assert list(state) == list(part.state_dict())  # torchvision's keys, in torchvision's order
        width = model.conv1.out_channels
        assert torch.equal(state["conv1.weight"], model.conv1.weight[s * width:(s + 1) * width])
        assert torch.equal(state["fc.bias"], model.fc.bias[s * model.num_classes:(s + 1) * model.num_classes])
    with torch.no_grad():
        parts[0].conv1.weight.zero_()
    assert model.conv1.weight.abs().sum() > 0  # copies, not views
    with pytest.raises(ValueError, match=r"branch index must be in \[0, 3\), got 3"):
        divco.branch_state_dict(model, 3)


# -- torchvision ResNets -------------------------------------------------------------------------------


def _torchvision_models(make, count=3):
    models = []
    for _ in range(count):
        m = make()
        with torch.no_grad():  # non-trivial BN state, so eval mode tests the running statistics
            for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
                bn.running_mean.normal_(0, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
        models.append(m)
    return models


@pytest.mark.parametrize("make", [
    lambda: tv.ResNet(tv.BasicBlock, [2, 1, 1, 1], num_classes=7),
    lambda: tv.ResNet(tv.Bottleneck, [1, 2, 1, 1], num_classes=5, groups=4, width_per_group=8),
], ids=["basic", "resnext"])
@pytest.mark.parametrize("execution", ["batched", "per_branch"])
def test_stack_of_torchvision_resnets_matches_them(make, execution):
    models = _torchvision_models(make, 2)
    batched = divco.stack(models, execution=execution)
    assert isinstance(batched, BranchBatchedResNet) and batched.branches == 2
    x = torch.randn(3, 2, 3, 40, 40)
    with torch.no_grad():
        for train in (False, True):
            batched.train(train)
            for m in models:
                m.train(train)
            assert_close(batched(x), branch_logits(models, x, per_view=True), 1e-5, f"train={train}")


def test_stacked_torchvision_resnets_unstack_to_equal_torchvision_resnets():
    models = _torchvision_models(lambda: tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4), 2)
    for m, back in zip(models, divco.unstack(divco.stack(models))):
        assert type(back) is tv.ResNet
        for (k, v), (k2, v2) in zip(m.state_dict().items(), back.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)


def test_replaced_classifier_is_representable():
    model = tv.resnet18()
    model.fc = nn.Linear(512, 10)  # the usual fine-tuning head
    _, spec = describe_torchvision_resnet(model)
    assert spec.num_classes == 10 and spec.widths == (64, 128, 256, 512)


class _MyResNet(tv.ResNet):
    pass


def _with(**changes):
    def make():
        model = tv.resnet18()
        for name, module in changes.items():
            setattr(model, name, module)
        return model
    return make


@pytest.mark.parametrize("make, message", [
    (lambda: _MyResNet(tv.BasicBlock, [2, 2, 2, 2]), "not the subclass _MyResNet"),
    (lambda: tv.resnet50(replace_stride_with_dilation=[False, True, True]), "module 'layer3.0.conv2'"),
    (lambda: tv.resnet18(norm_layer=lambda c: nn.GroupNorm(1, c)), "module 'bn1' is GroupNorm"),
    (_with(conv1=nn.Conv2d(3, 64, 3, 1, 1, bias=False)), "module 'conv1' is Conv2d"),
    (_with(maxpool=nn.Identity()), "module 'maxpool' is Identity"),
    (_with(fc=nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 10))), "cannot represent this torchvision ResNet"),
    (_with(bn1=nn.BatchNorm2d(64, eps=1e-3)), "module 'bn1' is BatchNorm2d"),
    (_with(extra=nn.Linear(2, 2)), "cannot represent this torchvision ResNet"),
])
def test_unrepresentable_torchvision_resnets_are_refused(make, message):
    with torch.device("meta"):
        model = make()
    with pytest.raises(ValueError, match=message):
        divco.stack([model, model])


# -- refusals ------------------------------------------------------------------------------------------


def test_stack_of_mismatched_architectures_raises():
    a, _ = build("wide_resnet", 1)
    b, _ = build("resnet_bottleneck", 1)
    with pytest.raises(ValueError, match="stack expects models of one architecture: model 0 is"):
        divco.stack([a, b])
    c = divco.models.create("wide_resnet16_4", num_classes=3)
    d = divco.models.create("wide_resnet16_4", num_classes=4)
    with pytest.raises(ValueError, match=r"model 1 is BranchBatchedCifarResNet\(.*num_classes=4"):
        divco.stack([c, d])
    with torch.device("meta"):
        r18, r34 = tv.resnet18(), tv.resnet34()
    mismatch = r"layers=\(2, 2, 2, 2\).*model 1 is BranchBatchedResNet\(.*layers=\(3, 4, 6, 3\)"
    with pytest.raises(ValueError, match=mismatch):
        divco.stack([r18, r34])
    p, _ = build("pyramidnet", 1)
    with pytest.raises(ValueError, match="model 1 is BranchBatchedPyramidNet"):
        divco.stack([a, p])


def test_stack_refuses_bad_input():
    a, _ = build("wide_resnet", 1)
    with pytest.raises(ValueError, match="non-empty sequence"):
        divco.stack([])
    two, _ = build("wide_resnet", 2)
    with pytest.raises(ValueError, match="model 0 has 2 branches"):
        divco.stack([two])
    with pytest.raises(ValueError, match="does not know how to batch model 1 of type Linear"):
        divco.stack([a, nn.Linear(2, 2)])
    b = divco.unstack(divco.stack([a]))[0]
    b.double()
    with pytest.raises(ValueError, match="one device and dtype"):
        divco.stack([a, b])
    c = divco.unstack(divco.stack([a]))[0]
    c.layer1.eval()
    with pytest.raises(ValueError, match="same train/eval mode, module by module; model 1 differs"):
        divco.stack([a, c])
    with pytest.raises(ValueError, match="unstack expects a divco BranchBatchedNetwork, got Linear"):
        divco.unstack(nn.Linear(2, 2))


class _WithPlainConv(BranchBatchedNetwork):
    family = "cifar"

    def __init__(self, spec, branches=1, execution="auto"):
        super().__init__(spec, branches, execution=execution)
        self.conv = nn.Conv2d(3, 3, 1)


def test_unstack_refuses_layers_it_cannot_split():
    from divco.models.pyramidnet import pyramidnet_spec

    model = _WithPlainConv(pyramidnet_spec(11, 1, 2, 2), branches=2)
    with pytest.raises(ValueError, match=r"module 'conv' \(Conv2d\) holds parameters .* not a branch-batched layer"):
        divco.unstack(model)


def test_stacked_copies_are_independent_of_the_inputs():
    models = [randomize_(build("wide_resnet", 1)[0]) for _ in range(2)]
    batched = divco.stack(models)
    before = batched.conv1.weight.clone()
    with torch.no_grad():
        models[0].conv1.weight.add_(1.0)
    assert torch.equal(batched.conv1.weight, before)


def test_stack_refuses_more_models_than_create_builds_branches():
    """65 models would build the 65-branch network create refuses: the same limit, checked before any copy."""
    a, _ = build("wide_resnet", 1)
    with pytest.raises(ValueError, match=r"between 1 and 64 \(divco supports at most MAX_BRANCHES = 64 branches\), "
                                         r"got 65"):
        divco.stack([a] * (divco.models.MAX_BRANCHES + 1))
    with pytest.raises(ValueError, match="branches must be between 1 and 64 for model 'resnet18'"):
        divco.models.create("resnet18", branches=65)
