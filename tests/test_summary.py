"""divco.summary: parameters and multiply-accumulates per branch and in total."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from optional_deps import needs_torchvision

import divco

sys.path.insert(0, str(Path(__file__).parent / "models"))
from model_matrix import shapes_only


def test_resnet50_has_the_usual_4_1_gmacs():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is optional (divco[vision])")
    with shapes_only():
        ours = divco.summary(divco.models.create("resnet50"), (3, 224, 224))
        theirs = divco.summary(torchvision.models.resnet50(), (3, 224, 224))
    assert ours.params_total == ours.params_per_branch == 25_557_032
    assert ours.macs_total == ours.macs_per_branch
    assert 4.05e9 < ours.macs_total < 4.15e9  # the figure usually quoted: 4.1 GMACs (torchvision: 4.09)
    assert (theirs.params_total, theirs.macs_total) == (ours.params_total, ours.macs_total)
    assert ours.name == "resnet50" and theirs.name == "ResNet" and theirs.branches == 1


@pytest.mark.parametrize("name, S, size", [
    pytest.param("resnet50", 2, (3, 224, 224), marks=needs_torchvision),  # its branches are torchvision ResNets
    ("wide_resnet16_8", 4, (3, 32, 32)), ("pyramidnet164", 3, (3, 16, 16)),
    pytest.param("resnext50_32x4d", 4, (3, 96, 96), marks=needs_torchvision)])
def test_totals_are_the_branches_summed(name, S, size):
    with shapes_only("cpu"):  # real (uninitialised) weights: cheaper than meta for BN-heavy networks
        model = divco.models.create(name, branches=S)
        total = divco.summary(model, size)
        branch = divco.summary(model.standalone_model(), size)
    assert total.branches == S
    assert total.params_total == S * branch.params_total == sum(p.numel() for p in model.parameters())
    assert total.macs_total == S * branch.macs_total
    assert (total.params_per_branch, total.macs_per_branch) == (branch.params_total, branch.macs_total)


def test_summary_restores_the_model_and_reads_well():
    model = divco.models.create("wide_resnet16_4", num_classes=10, branches=2, execution="per_branch")
    model.train()
    result = divco.summary(model, (3, 32, 32), name="wrn")
    assert model.training and model.execution == "per_branch"
    assert all(m.training for m in model.modules())
    text = str(result)
    for row in ("model", "wrn", "branches", "params / branch", "params total", "MACs / branch", "MACs total"):
        assert row in text
    assert result.as_dict()["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("size", [(3, 32), (3, 0, 32), (1, 2, 3, 4)])
def test_bad_input_size_raises(size):
    model = divco.models.create("wide_resnet16_4")
    with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\) with positive sizes, got"):
        divco.summary(model, size)


def test_summary_counts_the_same_on_the_cpu_and_on_meta():
    model = divco.models.create("wide_resnet16_4", branches=2)
    with shapes_only():
        on_meta = divco.summary(divco.models.create("wide_resnet16_4", branches=2), (3, 32, 32))
    assert divco.summary(model, (3, 32, 32)) == on_meta


def test_summary_shows_the_class_count():
    result = divco.summary(divco.models.create("wide_resnet16_1", num_classes=7, branches=2), (3, 32, 32))
    assert result.num_classes == 7 and result.as_dict()["num_classes"] == 7
    assert "classes          7" in str(result)
