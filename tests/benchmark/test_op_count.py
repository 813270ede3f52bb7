"""divco.benchmark.op_count: a training step with the fused BatchNorm dispatches fewer ops than
with PyTorch's (the running statistics are one update operator, not three ATen ops)."""

import importlib

import pytest

from divco.benchmark import op_count

bn_module = importlib.import_module("divco.ops.batch_norm")


@pytest.mark.skipif(not bn_module.native_available()[0], reason="the native CPU backend is not available here")
def test_fused_step_dispatches_fewer_ops_than_eager():
    eager = op_count.count_step("wide_resnet16_1", 2, "eager")
    fused = op_count.count_step("wide_resnet16_1", 2, "fused", "cpu")
    assert fused["ops"] < eager["ops"], (fused["ops"], eager["ops"])
    forwards = fused["by_op"]["divco.batch_norm_native.default"]
    assert fused["by_op"]["divco.batch_norm_update_stats_native.default"] == forwards
    for aten_update in ("aten.lerp_.Scalar", "aten.mul_.Tensor"):
        assert aten_update not in fused["by_op"], aten_update


def test_counter_counts_every_dispatched_op():
    import torch

    with op_count.OpCounter() as counter:
        torch.ones(3).add_(1).mul(2)
    assert counter.counts["aten.add_.Tensor"] == 1 and counter.counts["aten.mul.Tensor"] == 1
