"""set_norm_impl: the fused BatchNorm (+ReLU, +identity) and the eager one compute the same
function in every model family: logits, every gradient and the running statistics, batched
and per-branch execution, train and eval; the state_dict is the same."""

from __future__ import annotations

import copy

import pytest
import torch
from model_matrix import FAMILIES, assert_close, assert_gradients_close, build

from divco.nn import BranchBatchNorm2d, default_norm_impl, norm_act, set_norm_impl
from divco.ops.batch_norm import native_available

pytestmark = pytest.mark.skipif(not native_available()[0], reason="divco._C without the batch_norm op")


def run(model, x, train: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    logits = model(x)
    if train:
        logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("execution", ["batched", "per_branch"])
def test_fused_equals_eager(family, execution):
    torch.manual_seed(0)
    fused, size = build(family, 2)
    fused.execution = execution
    eager = copy.deepcopy(fused)
    set_norm_impl(fused, "fused")
    set_norm_impl(eager, "eager")
    assert fused.state_dict().keys() == eager.state_dict().keys()
    x = torch.randn(4, 3, size, size)
    for train in (True, True, False):  # two steps move the running statistics, then eval uses them
        out_f, grads_f = run(fused, x, train)
        out_e, grads_e = run(eager, x, train)
        assert_close(out_f, out_e, 1e-5, f"{family} {execution} logits (train={train})")
        if train:
            assert grads_f.keys() == grads_e.keys()
            assert_gradients_close(grads_f, grads_e, 1e-4, f"{family} {execution} gradient")
    for (name, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name


def test_state_dict_is_torchvision_batchnorm():
    bn = BranchBatchNorm2d(4, branches=2)
    set_norm_impl(bn, "fused")
    assert list(bn.state_dict()) == list(torch.nn.BatchNorm2d(8).state_dict())
    assert "impl='fused'" in repr(bn)


def test_auto_picks_fused_on_cuda_and_eager_on_cpus():
    # CPUs: the measured training step is slower with the fused op (see default_norm_impl)
    assert default_norm_impl(torch.randn(2, 3, 4, 4)) == "eager"
    assert default_norm_impl(torch.randn(2, 3, 4, 4, dtype=torch.float64)) == "eager"
    if torch.cuda.is_available():
        assert default_norm_impl(torch.randn(2, 3, 4, 4, device="cuda")) == "fused"
        assert default_norm_impl(torch.randn(2, 3, 4, 4, device="cuda", dtype=torch.float64)) == "eager"
    with pytest.raises(ValueError, match="impl must be one of"):
        set_norm_impl(BranchBatchNorm2d(2), "fast")


def test_momentum_none_and_untracked_stats():
    """Cumulative averaging (momentum=None) and track_running_stats=False behave as eager."""
    for kwargs in (dict(momentum=None), dict(track_running_stats=False), dict(affine=False)):
        a = BranchBatchNorm2d(3, branches=2, **kwargs)
        b = copy.deepcopy(a)
        set_norm_impl(a, "fused")
        set_norm_impl(b, "eager")
        x = torch.randn(4, 6, 5, 5)
        for _ in range(3):
            torch.testing.assert_close(a(x, activation="relu"), b(x, activation="relu"))
        torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=1e-5, atol=1e-6)


def test_sync_batchnorm_falls_back_to_eager():
    """nn.SyncBatchNorm (--sync-bn) is no BranchBatchNorm2d: norm_act runs it eagerly."""
    sync = torch.nn.SyncBatchNorm(4).eval()
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    expected = torch.relu(torch.nn.functional.batch_norm(x, sync.running_mean, sync.running_var, sync.weight,
                                                         sync.bias, False, 0.1, sync.eps) + r)
    torch.testing.assert_close(norm_act(sync, x, residual=r), expected)
    torch.testing.assert_close(norm_act(torch.nn.Identity(), x, relu=False), x)


def test_auto_runs_eagerly_inside_vmap():
    """torch.func transforms (the vmap benchmark method) see eager BN: the op has no batching rule."""
    bn = BranchBatchNorm2d(3, branches=1)
    params = {k: torch.stack([v, v * 2]) for k, v in bn.named_parameters()}
    buffers = {k: torch.stack([v, v]) for k, v in bn.named_buffers()}
    x = torch.randn(4, 2, 3, 5, 5)  # mapped over dim 1, as a per-view batch [N, S, C, H, W] is

    def call(p, b, xi):
        return torch.func.functional_call(bn, (p, b), (xi,), {"activation": "relu"})

    out = torch.vmap(call, in_dims=(0, 0, 1))(params, buffers, x)
    for i in range(2):
        expected = torch.relu(torch.nn.functional.batch_norm(x[:, i], None, None, params["weight"][i],
                                                             params["bias"][i], True, 0.1, 1e-5))
        torch.testing.assert_close(out[i], expected)
