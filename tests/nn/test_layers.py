"""Each Branch* layer equals S standard layers on the branch slices, values and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from divco.nn import (
    BranchBatchNorm2d,
    BranchConv2d,
    BranchDropPath,
    BranchLinear,
    BranchShakeDrop,
    single_branch,
)


def standard_conv(layer: BranchConv2d, s: int) -> nn.Conv2d:
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, bias=layer.bias is not None).double()
    with torch.no_grad():
        conv.weight.copy_(layer.branch_weight(s))
        if layer.bias is not None:
            conv.bias.copy_(layer.branch_bias(s))
    return conv


@settings(max_examples=25, deadline=None)
@given(
    S=st.integers(1, 4), cin=st.integers(1, 6), cout=st.integers(1, 6), groups=st.sampled_from([1, 2]),
    k=st.sampled_from([1, 3]), stride=st.integers(1, 2), bias=st.booleans(),
    impl=st.sampled_from(["grouped", "split", "auto"]), channels_last=st.booleans(),
)
def test_conv_matches_standard_convs(S, cin, cout, groups, k, stride, bias, impl, channels_last):
    cin, cout = cin * groups, cout * groups
    layer = BranchConv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias, branches=S, impl=impl).double()
    x = torch.randn(3, S * cin, 7, 6, dtype=torch.float64, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out = layer(xin)
    refs = [standard_conv(layer, s)(x[:, s * cin:(s + 1) * cin]) for s in range(S)]
    torch.testing.assert_close(out, torch.cat(refs, 1))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.weight], g)
    ref_grads = torch.autograd.grad(torch.cat(refs, 1), [x], g)
    torch.testing.assert_close(grads[0], ref_grads[0])
    # weight gradient of branch s only depends on branch s
    for s in range(S):
        conv = standard_conv(layer, s)
        (ref_w,) = torch.autograd.grad(conv(x[:, s * cin:(s + 1) * cin].detach()), [conv.weight],
                                       g[:, s * cout:(s + 1) * cout])
        torch.testing.assert_close(grads[1][s * cout:(s + 1) * cout], ref_w)


def test_conv_shared_input_and_per_branch_mode():
    layer = BranchConv2d(3, 4, 3, 1, 1, branches=3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = layer(x)
    for s in range(3):
        torch.testing.assert_close(out[:, 4 * s:4 * (s + 1)], standard_conv(layer, s)(x))
        with single_branch(s):
            torch.testing.assert_close(layer(x), out[:, 4 * s:4 * (s + 1)])


def test_conv_errors_name_expected_and_received():
    layer = BranchConv2d(4, 4, 3, branches=2)
    with pytest.raises(ValueError, match=r"expects 8 input channels .*got 5"):
        layer(torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match="4-D input"):
        layer(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="impl must be one of"):
        BranchConv2d(4, 4, 3, impl="fast")
    with pytest.raises(ValueError, match="branches must be a positive int"):
        BranchConv2d(4, 4, 3, branches=0)
    grouped = BranchConv2d(4, 4, 3, groups=2, branches=2)
    with pytest.raises(ValueError, match="expects 8 input channels"):
        grouped(torch.randn(1, 4, 4, 4))  # no shared input with inner groups


def test_conv_init_uses_each_branch_fan():
    layer = BranchConv2d(64, 64, 3, branches=8)
    layer.kaiming_normal_(mode="fan_out")
    expected_std = (2.0 / (64 * 9)) ** 0.5  # fan_out of ONE branch, not of 8 stacked ones
    assert abs(layer.weight.std().item() / expected_std - 1) < 0.05


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_matches_standard_and_per_branch(training, momentum):
    S, C = 3, 4
    layer = BranchBatchNorm2d(C, branches=S, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    per_branch = BranchBatchNorm2d(C, branches=S, momentum=momentum).double()
    per_branch.load_state_dict(layer.state_dict())
    standard = [nn.BatchNorm2d(C, momentum=momentum).double() for _ in range(S)]
    for s, bn in enumerate(standard):
        bn.load_state_dict({k: (v[s * C:(s + 1) * C] if v.dim() else v) for k, v in layer.state_dict().items()})
    for m in [layer, per_branch, *standard]:
        m.train(training)
    x = torch.randn(5, S * C, 3, 3, dtype=torch.float64)
    for _ in range(2):  # twice: running statistics and the shared counter evolve alike
        out = layer(x)
        outs = []
        for s in range(S):
            with single_branch(s):
                outs.append(per_branch(x[:, s * C:(s + 1) * C]))
        refs = [bn(x[:, s * C:(s + 1) * C]) for s, bn in enumerate(standard)]
        torch.testing.assert_close(out, torch.cat(refs, 1))
        torch.testing.assert_close(torch.cat(outs, 1), out)
    for s, bn in enumerate(standard):
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(layer, key)[s * C:(s + 1) * C], getattr(bn, key))
            torch.testing.assert_close(getattr(per_branch, key), getattr(layer, key))
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == int(per_branch.num_batches_tracked)
    with pytest.raises(ValueError, match=r"expects 12 channels \(3 branches x 4\), got 4"):
        layer(torch.randn(2, 4, 3, 3, dtype=torch.float64))


@settings(max_examples=20, deadline=None)
@given(S=st.integers(1, 5), cin=st.integers(1, 7), cout=st.integers(1, 7), bias=st.booleans())
def test_linear_matches_standard(S, cin, cout, bias):
    layer = BranchLinear(cin, cout, bias=bias, branches=S).double()
    x = torch.randn(4, S, cin, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (4, S, cout)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, [x, layer.weight], g)
    for s in range(S):
        lin = nn.Linear(cin, cout, bias=bias).double()
        with torch.no_grad():
            lin.weight.copy_(layer.branch_weight(s))
            if bias:
                lin.bias.copy_(layer.branch_bias(s))
        ref = lin(x[:, s])
        torch.testing.assert_close(out[:, s], ref)
        rx, rw = torch.autograd.grad(ref, [x, lin.weight], g[:, s])
        torch.testing.assert_close(gx[:, s], rx[:, s])
        torch.testing.assert_close(gw[s * cout:(s + 1) * cout], rw)
        with single_branch(s):
            torch.testing.assert_close(layer(x[:, s:s + 1]), out[:, s:s + 1])
    with pytest.raises(ValueError, match=rf"expects input \[N, {S}, {cin}\]"):
        layer(torch.randn(4, S + 1, cin, dtype=torch.float64))


def test_drop_path_decides_per_sample_and_branch():
    S, C, N = 4, 3, 2000
    layer = BranchDropPath(0.5, branches=S)
    x = torch.ones(N, S * C, 2, 2)
    out = layer(x).unflatten(1, (S, C))
    # within one (sample, branch) every element shares the decision ...
    flat = out.flatten(2)
    assert torch.all(flat.amax(2) == flat.amin(2))
    kept = flat[:, :, 0] > 0
    # ... and decisions differ across branches of one sample and across samples
    assert 0.4 < kept.float().mean() < 0.6
    assert (kept[:, 0] != kept[:, 1]).any() and (kept[:, 0] != kept[0, 0]).any()
    torch.testing.assert_close(flat[kept], torch.full_like(flat[kept], 2.0))
    layer.eval()
    assert torch.equal(layer(x), x)


def test_shakedrop_forward_and_backward_scales():
    S, C, N = 3, 2, 4000
    layer = BranchShakeDrop(0.5, branches=S, gate="sample")  # the departure: one gate per sample
    x = torch.ones(N, S * C, 1, 1, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    fwd = out.detach().unflatten(1, (S, C))[..., 0, 0]
    bwd = x.grad.unflatten(1, (S, C))[..., 0, 0]
    assert torch.all(fwd[:, :, 0] == fwd[:, :, 1]) and torch.all(bwd[:, :, 0] == bwd[:, :, 1])
    kept = fwd[:, :, 0] == 1.0
    assert 0.45 < kept.float().mean() < 0.55  # gate ~ Bernoulli(1 - p) per sample and branch
    assert torch.all(bwd[kept][:, 0] == 1.0)
    dropped_fwd, dropped_bwd = fwd[~kept][:, 0], bwd[~kept][:, 0]
    assert dropped_fwd.min() >= -1 and dropped_fwd.max() <= 1 and dropped_fwd.min() < -0.5
    assert dropped_bwd.min() >= 0 and dropped_bwd.max() <= 1
    assert not torch.equal(dropped_fwd, dropped_bwd)  # backward draws its own factor
    layer.eval()
    torch.testing.assert_close(layer(x), x * 0.5)


def test_shakedrop_default_draws_one_gate_per_batch_and_branch_as_the_official_code():
    """Official ShakeDrop: one Bernoulli gate for the whole batch (per branch); alpha, beta per sample."""
    S, C, N = 4, 2, 64
    layer = BranchShakeDrop(0.5, branches=S)
    assert layer.gate == "batch"
    kept_per_branch = []
    for _ in range(40):
        x = torch.ones(N, S * C, 1, 1, requires_grad=True)
        out = layer(x)
        out.sum().backward()
        fwd = out.detach().unflatten(1, (S, C))[..., 0, 0]  # [N, S, C]
        kept = (fwd[:, :, 0] == 1.0)
        # within a branch every sample shares the gate (dropped samples have alpha != 1)
        assert torch.all(kept.all(0) | (~kept).all(0))
        dropped = ~kept[0]
        if dropped.any():  # alpha varies per sample where the batch's gate dropped
            assert fwd[:, dropped, 0].std(0).min() > 0
        kept_per_branch.append(kept[0])
    kept = torch.stack(kept_per_branch)  # [draws, S]
    assert 0.2 < kept.float().mean() < 0.8 and (kept[:, 0] != kept[:, 1]).any()  # branches draw their own


def test_shakedrop_rejects_an_unknown_gate():
    with pytest.raises(ValueError, match="gate must be one of 'batch', 'sample'; got 'pixel'"):
        BranchShakeDrop(0.5, gate="pixel")
