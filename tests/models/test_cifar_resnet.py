"""CIFAR ResNets: the paper's parameter counts and every registered network's shapes."""

from __future__ import annotations

import pytest
import torch
from model_matrix import shapes_only

import divco

CIFAR_MODELS = ["pyramidnet164", "pyramidnet272", "resnet110", "resnet164", "resnext29_16x64d", "resnext29_8x64d",
                "se_resnet110", "se_resnet164", "wide_resnet16_1", "wide_resnet16_12", "wide_resnet16_2",
                "wide_resnet16_4",
                "wide_resnet16_8", "wide_resnet28_10", "wide_resnet40_10", "wide_resnet52_8"]


def _millions(name: str, S: int, **kw) -> float:
    with shapes_only():
        model = divco.models.create(name, num_classes=100, branches=S, **kw)
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_the_cifar_family_is_registered():
    assert divco.models.list("cifar") == CIFAR_MODELS


@pytest.mark.parametrize("name, S, millions", [
    ("wide_resnet28_10", 1, 36.5), ("wide_resnet28_10", 2, 35.8), ("wide_resnet28_10", 4, 36.7),
    ("wide_resnet16_8", 1, 11.0), ("wide_resnet16_8", 2, 12.4), ("wide_resnet16_8", 4, 11.1),
    ("resnet110", 1, 1.17), ("resnet110", 2, 1.33), ("resnet110", 4, 1.21),
])
def test_parameter_counts_reproduce_the_paper(name, S, millions):
    """Zhao et al. (TIP 2022), CIFAR-100 heads, all branches together."""
    assert _millions(name, S) == pytest.approx(millions, abs=0.1)


@pytest.mark.parametrize("S", [1, 2, 4])
def test_wide_resnet16_1_is_wrn16_1_per_branch(S):
    """WRN-16-1 (Zagoruyko & Komodakis: 0.175M on CIFAR-10) has no narrower width: k' = 1 per branch."""
    with shapes_only():
        model = divco.models.create("wide_resnet16_1", num_classes=10, branches=S)
    head = 64 * 10 + 10  # one CIFAR-10 classifier per branch
    body = (sum(p.numel() for p in model.parameters()) - S * head) / S
    assert body + head == pytest.approx(0.175e6, rel=0.01)
    assert model.spec.widths == (16, 32, 64)


def test_divide_false_gives_full_size_branches():
    assert _millions("wide_resnet16_8", 4, divide=False) == pytest.approx(4 * _millions("wide_resnet16_8", 1))


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_registered_models_run_divided(name):
    """Shapes through the whole network, divided by a branch count outside the official tables."""
    with shapes_only("cpu"), torch.no_grad():
        model = divco.models.create(name, num_classes=7, branches=3, execution="batched").eval()
        assert model(torch.zeros(2, 3, 3, 8, 8)).shape == (2, 3, 7)


@pytest.mark.parametrize("S, p", [(1, 0.1), (2, 0.05), (4, 0.025)])
def test_wrn40_10_has_official_dropout_over_s(S, p):
    with shapes_only():
        model = divco.models.create("wide_resnet40_10", num_classes=100, branches=S)
        other = divco.models.create("wide_resnet28_10", num_classes=100, branches=S)
    assert model.dropout.p == pytest.approx(p) and other.dropout is None
    with shapes_only():
        assert divco.models.create("wide_resnet40_10", branches=4, divide=False).dropout.p == pytest.approx(0.1)
        assert divco.models.create("wide_resnet40_10", branches=4, dropout=0.3).dropout.p == pytest.approx(0.3)


def test_wrn40_10_dropout_acts_in_training_only():
    model = divco.models.create("wide_resnet40_10", num_classes=4, branches=1)
    features = torch.ones(2000, 1, model.features)
    model.train()
    dropped = (model.dropout(features) == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.01)
    model.eval()
    assert torch.equal(model.dropout(features), features)


@pytest.mark.parametrize("name, zeroed", [("se_resnet110", False), ("se_resnet164", False), ("resnet110", True)])
def test_se_resnets_do_not_zero_init_the_last_bn(name, zeroed):
    model = divco.models.create(name, num_classes=10, branches=2)
    last_bns = [block.bn3.weight for layer in (model.layer1, model.layer2, model.layer3) for block in layer]
    assert all(bool(torch.all(w == 0)) == zeroed for w in last_bns)
    assert all(torch.all(w == 1) for w in last_bns) or zeroed
