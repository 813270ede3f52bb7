"""BranchBatchNorm2d's dispatch: a training step with the fused BatchNorm dispatches fewer ops
than with eager BN, momentum=None reads nothing back to the host, and the module checks its
own parameters once per state, not per call (they are still checked: a bad eps is an error)."""

from __future__ import annotations

import collections
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import divco
from divco.nn import BranchBatchNorm2d, set_norm_impl
from divco.nn.branching import single_branch
from divco.ops import validation
from divco.ops.batch_norm import native_available

pytestmark = pytest.mark.skipif(not native_available()[0], reason="divco._C without the batch_norm op")


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def ops_per_training_step(impl: str) -> collections.Counter:
    torch.manual_seed(0)
    model = set_norm_impl(divco.models.create("wide_resnet16_1", num_classes=10, branches=2), impl).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, target = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        divco.ops.cotrain_loss(model(x), target).loss.backward()
        optimizer.step()

    step()  # first step: optimizer state, lazy initialisation
    with OpCount() as count:
        step()
    return count.ops


def test_fused_training_step_dispatches_fewer_ops_than_eager():
    """Per fused BN: the op, one foreach update of both running statistics (+ the variance's
    unbiasing), its backward; no zero gradients for the statistics, no detach of saved stats."""
    fused, eager = ops_per_training_step("fused"), ops_per_training_step("eager")
    assert fused["batch_norm_native"] > 0 and eager["native_batch_norm"] > 0
    assert sum(fused.values()) < sum(eager.values()), (sum(fused.values()), sum(eager.values()))
    assert fused["zeros"] <= eager["zeros"]


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("execution", ["batched", "per_branch"])
def test_cumulative_momentum_reads_nothing_back_and_matches_batchnorm2d(impl, execution):
    bn = set_norm_impl(BranchBatchNorm2d(3, branches=2, momentum=None), impl).train()
    reference = [torch.nn.BatchNorm2d(3, momentum=None).train() for _ in range(2)]
    for step in range(3):
        x = torch.randn(4, 6, 3, 3) * (step + 1) + step
        with OpCount() as count:
            if execution == "batched":
                bn(x, activation="relu")
            else:
                for i in range(2):
                    with single_branch(i):
                        bn(x[:, 3 * i:3 * (i + 1)])
        assert count.ops["_local_scalar_dense"] == 0, count.ops
        for i, ref in enumerate(reference):
            ref(x[:, 3 * i:3 * (i + 1)])
    assert int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, torch.cat([r.running_mean for r in reference]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.cat([r.running_var for r in reference]), rtol=1e-5, atol=1e-6)


def test_parameters_are_checked_once_per_state(monkeypatch):
    calls = []
    original = validation.check_batch_norm_parameters
    monkeypatch.setattr(validation, "check_batch_norm_parameters", lambda *a, **k: calls.append(1) or original(*a, **k))
    bn = set_norm_impl(BranchBatchNorm2d(3, branches=2), "fused").train()
    x = torch.randn(2, 6, 3, 3)
    for _ in range(3):
        bn(x)
    assert len(calls) == 1
    bn.momentum = 0.5  # a changed hyperparameter is checked again
    bn(x)
    bn.weight = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))  # so is a reassigned parameter
    with pytest.raises(ValueError, match="weight must be float32 or x's dtype"):
        bn(x)
    bn.weight = torch.nn.Parameter(torch.ones(6))
    bn.eps = 0.0
    with pytest.raises(ValueError, match="eps must be a finite number > 0; got 0.0"):
        bn(x)
    bn.eps = 1e-5
    bn.double()  # a cast is checked again (and accepted: float64 x, float64 parameters)
    bn(x.double())
    assert len(calls) == 5
    set_norm_impl(bn, "eager")(x.double())
    assert len(calls) == 5, "eager BN (momentum set) runs F.batch_norm, no divco checks"
