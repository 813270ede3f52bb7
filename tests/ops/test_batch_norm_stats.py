"""divco::batch_norm_update_stats_<b>: the fused BatchNorm's running-statistics update, one
mutating operator per backend, against a float64 reference (momentum and the cumulative
average), opcheck, its refusals, what divco.ops.batch_norm dispatches, and torch.compile."""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from backend_params import backend_params, device_for

from divco.nn import BranchBatchNorm2d, set_norm_impl
from divco.ops.batch_norm import batch_norm

bn_module = importlib.import_module("divco.ops.batch_norm")

FUSED = ("triton", "cpu", "cuda")
SUFFIX = {"triton": "triton", "cpu": "native", "cuda": "native"}


def update_op(backend: str):
    name = f"batch_norm_update_stats_{SUFFIX[backend]}"
    if not hasattr(torch.ops.divco, name):
        pytest.skip(f"divco::{name} is not registered here (an extension built before it)")
    return getattr(torch.ops.divco, name).default


def reference_update(running_mean, running_var, mean, var, momentum, count, batches):
    """nn.BatchNorm2d's rule in float64: factor = momentum or 1 / num_batches_tracked."""
    factor = 1.0 / batches if momentum is None else momentum
    unbiased = var.double() * count / (count - 1)
    return ((1 - factor) * running_mean.double() + factor * mean.double(),
            (1 - factor) * running_var.double() + factor * unbiased)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(C=st.integers(1, 70), momentum=st.one_of(st.none(), st.floats(0.0, 1.0)), count=st.integers(2, 10**6),
       batches=st.integers(1, 10**4), seed=st.integers(0, 2**16))
def test_update_matches_float64_reference(backend, C, momentum, count, batches, seed):
    device = device_for(backend)
    g = torch.Generator().manual_seed(seed)
    running_mean, mean = torch.randn(C, generator=g), torch.randn(C, generator=g) * 3
    running_var, var = torch.rand(C, generator=g) + 0.5, torch.rand(C, generator=g) * 4
    expected = reference_update(running_mean, running_var, mean, var, momentum, count, batches)
    rm, rv = running_mean.to(device), running_var.to(device)
    nbt = torch.tensor(batches, dtype=torch.int64, device=device)
    update_op(backend)(rm, rv, mean.to(device), var.to(device), nbt, momentum, count)
    torch.testing.assert_close(rm.cpu().double(), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv.cpu().double(), expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_opcheck(backend, momentum):
    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(6, generator=g).to(device), (torch.rand(6, generator=g) + 0.5).to(device),
            torch.randn(6, generator=g).to(device), torch.rand(6, generator=g).to(device),
            torch.tensor(3, dtype=torch.int64, device=device), momentum, 40)
    torch.library.opcheck(update_op(backend), args)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_refusals(backend):
    device = device_for(backend)
    op = update_op(backend)
    C = 4
    good = dict(running_mean=torch.zeros(C, device=device), running_var=torch.ones(C, device=device),
                mean=torch.zeros(C, device=device), var=torch.ones(C, device=device))

    def call(momentum=0.1, count=8, nbt=None, **overrides):
        t = {**good, **overrides}
        op(t["running_mean"], t["running_var"], t["mean"], t["var"], nbt, momentum, count)

    with pytest.raises(ValueError, match="int64"):
        call(momentum=None, nbt=torch.tensor(3.0, device=device))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        call(momentum=None, nbt=None)
    with pytest.raises(ValueError, match="float32"):
        call(running_var=torch.ones(C, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="float32"):
        call(mean=torch.zeros(C + 1, device=device))
    with pytest.raises(ValueError, match="count"):
        call(count=1)
    with pytest.raises(ValueError, match="momentum"):
        call(momentum=1.5)


@pytest.mark.parametrize("backend", backend_params(*FUSED, "torch"))
def test_public_function_refuses_a_float_counter(backend):
    device = device_for(backend)
    x = torch.randn(2, 3, 2, 2, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="int64"):
        batch_norm(x, None, None, rm, rv, training=True, momentum=None, backend=backend,
                   num_batches_tracked=torch.tensor(1.0, device=device))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_training_forward_updates_with_one_op(backend, momentum):
    """The running statistics: one update operator per forward, no ATen arithmetic on them."""
    device = device_for(backend)
    update_op(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 2, 3, generator=g).to(device)
    rm, rv = torch.randn(5, generator=g).to(device), (torch.rand(5, generator=g) + 0.5).to(device)
    nbt = torch.tensor(4, dtype=torch.int64, device=device)
    expected_rm, expected_rv = rm.clone(), rv.clone()
    F_out = torch.nn.functional.batch_norm(x.double(), expected_rm.double(), expected_rv.double(), None, None, True,
                                           0.25 if momentum is None else momentum)
    with CountOps() as counter:
        out = batch_norm(x, None, None, rm, rv, training=True, momentum=momentum, backend=backend,
                         num_batches_tracked=nbt)
    update = f"divco.batch_norm_update_stats_{SUFFIX[backend]}.default"
    assert counter.names.count(update) == 1, counter.names
    assert not {"aten.lerp_.Scalar", "aten.lerp_.Tensor", "aten.mul_.Tensor", "aten.add_.Tensor"} & set(counter.names)
    torch.testing.assert_close(out.double(), F_out, rtol=2e-4, atol=2e-4)
    ref_mean, ref_var = reference_update(expected_rm, expected_rv, x.double().mean((0, 2, 3)),
                                         x.double().var((0, 2, 3), correction=0), momentum, 18, 4)
    torch.testing.assert_close(rm.double().cpu(), ref_mean.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv.double().cpu(), ref_var.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_compiled_module_fullgraph(backend, momentum, monkeypatch):
    """torch.compile(fullgraph=True) of a fused BranchBatchNorm2d computes the eager module's
    outputs and running statistics, momentum=None included (no host read to break the graph)."""
    device = device_for(backend)
    update_op(backend)
    monkeypatch.setenv("DIVCO_BACKEND", backend)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    eager = set_norm_impl(BranchBatchNorm2d(3, momentum=momentum, branches=2), "fused").to(device).train()
    compiled_module = pickle.loads(pickle.dumps(eager))
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(4, 6, 3, 3, generator=g).to(device)
        r = torch.randn(4, 6, 3, 3, generator=g).to(device)
        expected = eager(x, residual=r, activation="relu")
        got = compiled(x, residual=r, activation="relu")
        torch.testing.assert_close(got, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(compiled_module, name), getattr(eager, name), msg=name)


def test_module_pickles_after_a_fused_call():
    bn = set_norm_impl(BranchBatchNorm2d(2, branches=2), "fused")
    if not bn_module.native_available()[0]:
        pytest.skip("the native CPU backend is not available here")
    bn(torch.randn(3, 4, 2, 2))
    copy = pickle.loads(pickle.dumps(bn))
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(copy(x), bn(x))


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_small_triton_step_launches_five_kernels(backend):
    """A small input (one program per channel tile covers it): forward = reduction with its
    finalize + elementwise pass, then the running update; backward = reduction + elementwise pass."""
    from divco.benchmark.op_count import count_triton_launches

    device = device_for(backend)
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with count_triton_launches() as launches:
        out = batch_norm(x, None, None, rm, rv, training=True, activation="relu", backend=backend)
        out.backward(torch.ones_like(out))
    assert dict(launches) == {"bn_partial_sums_kernel": 2, "bn_forward_kernel": 1, "bn_update_stats_kernel": 1,
                              "bn_backward_kernel": 1}
