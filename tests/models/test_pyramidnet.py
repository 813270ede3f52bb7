"""PyramidNet + ShakeDrop: the official architecture, its dividing rule, per-branch padding and gates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_matrix import assert_close, branch_logits, randomize_, shapes_only

import divco
from divco.models.pyramidnet import (
    BranchBatchedPyramidNet,
    PyramidNetSpec,
    add_zero_padded_shortcut,
    pyramidnet_spec,
)
from divco.nn import single_branch


def _blocks(model):
    return [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]


@pytest.mark.parametrize("name, alpha, n", [("pyramidnet164", 270, 18), ("pyramidnet272", 200, 30)])
@pytest.mark.parametrize("S", [1, 2, 3, 4])
def test_widening_and_shakedrop_schedule_follow_the_dividing_rule(name, alpha, n, S):
    with shapes_only():
        model = divco.models.create(name, num_classes=100, branches=S)
    blocks = _blocks(model)
    assert len(blocks) == 3 * n
    add_rate = alpha / (3 * n * math.sqrt(S))  # alpha / sqrt(S), spread over the 3n blocks
    final_p = 0.5 / math.sqrt(S)
    inplanes = 16  # the stem is not divided (official code)
    for i, block in enumerate(blocks):
        planes = round(16 + add_rate * (i + 1))
        assert block.conv1.in_channels == inplanes
        assert (block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels) == (
            planes, planes, 4 * planes)
        assert block.shake_drop.p == pytest.approx(final_p * (i + 1) / (3 * n))
        assert block.shake_drop.branches == S
        downsamples = i in (n, 2 * n)
        assert block.conv2.stride == ((2, 2) if downsamples else (1, 1))
        assert (block.downsample is not None) == downsamples
        assert not any(p.numel() for m in [block.downsample] if m is not None for p in m.parameters())
        inplanes = 4 * planes
    assert model.features == inplanes == 4 * round(16 + alpha / math.sqrt(S))
    assert blocks[-1].shake_drop.p == pytest.approx(final_p)


def test_parameter_counts():
    """CIFAR-100 heads; S=1 matches PyramidNet-272 (alpha 200)'s published ~26M."""
    expected = {("pyramidnet272", 1): 26.29, ("pyramidnet272", 2): 28.87, ("pyramidnet272", 4): 32.77,
                ("pyramidnet164", 1): 27.32, ("pyramidnet164", 2): 29.34, ("pyramidnet164", 4): 32.37}
    for (name, S), millions in expected.items():
        with shapes_only():
            model = divco.models.create(name, num_classes=100, branches=S)
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01), (name, S)


def test_divide_false_keeps_full_size_branches():
    assert pyramidnet_spec(272, 200, 10, 4, divide=False) == pyramidnet_spec(272, 200, 10, 1)
    spec = pyramidnet_spec(164, 270, 10, 4)
    assert spec.alpha == pytest.approx(135.0) and spec.final_shakedrop_p == pytest.approx(0.25)


def test_state_dict_uses_the_official_names():
    model = BranchBatchedPyramidNet(pyramidnet_spec(11, 6, 10, 1), 1)
    keys = set(model.state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.bn1.weight", "layer1.0.conv3.weight",
                "layer3.0.bn4.running_var", "bn_final.weight", "fc.weight", "fc.bias"]:
        assert key in keys
    assert not any(k.startswith("layer2.0.downsample") for k in keys)  # the shortcut has no parameters


def test_bad_spec_raises():
    with pytest.raises(ValueError, match=r"depth must be 9n\+2 with n >= 1, got 100"):
        PyramidNetSpec(100, 200.0, 0.5)
    with pytest.raises(ValueError, match=r"final_shakedrop_p must be in \[0, 1\], got 1.5"):
        divco.models.create("pyramidnet164", final_shakedrop_p=1.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        PyramidNetSpec(11, -1.0, 0.5)


# -- the shortcut: zero channels appended per branch ------------------------------------------------


def _padded_reference(residual, shortcut, S):
    c_out, c_in = residual.shape[1] // S, shortcut.shape[1] // S
    parts = [residual[:, s * c_out:(s + 1) * c_out] + F.pad(shortcut[:, s * c_in:(s + 1) * c_in],
                                                            (0, 0, 0, 0, 0, c_out - c_in))
             for s in range(S)]
    return torch.cat(parts, dim=1)


@settings(max_examples=30, deadline=None)
@given(S=st.integers(1, 4), c_in=st.integers(1, 5), extra=st.integers(0, 4), n=st.integers(1, 3),
       h=st.integers(1, 4), channels_last=st.booleans())
def test_shortcut_padding_is_per_branch(S, c_in, extra, n, h, channels_last):
    c_out = c_in + extra
    residual = torch.randn(n, S * c_out, h, h + 1, dtype=torch.float64)
    shortcut = torch.randn(n, S * c_in, h, h + 1, dtype=torch.float64, requires_grad=True)
    if channels_last:
        residual = residual.contiguous(memory_format=torch.channels_last)
    out = add_zero_padded_shortcut(residual, shortcut, S)
    expected = _padded_reference(residual, shortcut, S)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # per-branch execution: one branch's block alone
    for s in range(S):
        with single_branch(s):
            torch.testing.assert_close(
                add_zero_padded_shortcut(residual[:, s * c_out:(s + 1) * c_out],
                                         shortcut[:, s * c_in:(s + 1) * c_in], S),
                expected[:, s * c_out:(s + 1) * c_out], rtol=0, atol=0)
    # the gradient reaches each branch's shortcut channels only from that branch's first c_in channels
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, shortcut, g)
    for s in range(S):
        torch.testing.assert_close(grad[:, s * c_in:(s + 1) * c_in], g[:, s * c_out:s * c_out + c_in])


def test_shortcut_cannot_drop_channels():
    with pytest.raises(ValueError, match="cannot drop channels: 4 -> 2 per branch"):
        add_zero_padded_shortcut(torch.randn(1, 4, 2, 2), torch.randn(1, 8, 2, 2), 2)


# -- ShakeDrop ---------------------------------------------------------------------------------------


def test_eval_mode_applies_the_shakedrop_schedule_per_branch():
    """Eval scales each residual path by 1 - p_i; the unstacked branches scale the same way."""
    spec = pyramidnet_spec(20, 12, 5, 3)  # p = 0.5 / sqrt(3), rising over 6 blocks
    model = randomize_(BranchBatchedPyramidNet(spec, 3)).eval()
    parts = divco.unstack(model)
    x = torch.randn(2, 3, 3, 8, 8)
    with torch.no_grad():
        for execution in ("batched", "per_branch"):
            model.execution = execution
            assert_close(model(x), branch_logits(parts, x, True), 1e-5, f"{execution} eval logits")
        without = BranchBatchedPyramidNet(pyramidnet_spec(20, 12, 5, 3, final_shakedrop_p=0.0), 3)
        without.load_state_dict(model.state_dict())
        assert (without.eval()(x) - model(x)).abs().max() > 1e-3  # the schedule does change the output


@pytest.mark.parametrize("execution", ["batched", "per_branch"])
def test_train_mode_draws_shakedrop_gates_per_branch_and_sample(execution):
    """Two identical branches on one image: equal in eval, different in training (independent gates)."""
    single = randomize_(BranchBatchedPyramidNet(pyramidnet_spec(11, 6, 5, 1, final_shakedrop_p=1.0), 1))
    model = divco.stack([single, single], execution=execution)
    x = torch.randn(1, 3, 8, 8).repeat(4, 1, 1, 1)  # four identical samples
    with torch.no_grad():
        model.eval()
        logits = model(x)
        torch.testing.assert_close(logits[:, 0], logits[:, 1], rtol=0, atol=0)
        logits = model.train()(x)
    assert (logits[:, 0] - logits[:, 1]).abs().max() > 1e-4, "both branches drew the same gates"
    assert (logits[0] - logits[1]).abs().max() > 1e-4, "two samples drew the same gates"

