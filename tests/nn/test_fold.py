"""divco.nn.fold: every BatchNorm that follows a convolution folds into it, and the folded
model computes the same eval-mode logits, in every model family (batched and per-branch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from model_matrix import FAMILIES, build  # noqa: E402

from divco.nn import BranchBatchNorm2d, BranchConv2d  # noqa: E402
from divco.nn.fold import apply_fold_structure, conv_bn_pairs, fold_batchnorm  # noqa: E402

#: BatchNorms that follow no convolution: PyramidNet's pre-activation BNs (after the residual add).
UNFOLDABLE = {"pyramidnet": ("bn1", "bn_final")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folded_model_computes_the_same_logits(family):
    model, size = build(family, 2)
    model.eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    bns_before = [n for n, m in model.named_modules() if isinstance(m, BranchBatchNorm2d)]
    pairs = fold_batchnorm(model, x)
    assert pairs and all(isinstance(model.get_submodule(c), BranchConv2d) for c, _ in pairs)
    left = [n for n, m in model.named_modules() if isinstance(m, BranchBatchNorm2d)]
    assert len(left) + len(pairs) == len(bns_before)
    assert all(n.rsplit(".", 1)[-1] in UNFOLDABLE.get(family, ()) for n in left), left
    for execution in ("batched", "per_branch"):
        model.execution = execution
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_fold_of_torchvision_style_modules_and_structure_reload():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False),
                          nn.BatchNorm2d(2, affine=False))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    expected = model.eval()(x)
    pairs = fold_batchnorm(model, x)
    assert pairs == [("0", "1"), ("3", "4")]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False),
                          nn.BatchNorm2d(2, affine=False))
    apply_fold_structure(fresh, pairs).load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_a_convolution_output_used_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output also bypasses its BN: folding would change it

    model = Twice()
    with torch.no_grad():
        model.bn.running_mean.fill_(3.0)
    assert conv_bn_pairs(model, torch.randn(1, 2, 3, 3)) == [("conv", "bn")]
    with pytest.raises(ValueError, match="changed the model's outputs"):
        fold_batchnorm(model, torch.randn(1, 2, 3, 3))
