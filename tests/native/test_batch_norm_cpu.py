"""The native batch_norm operators on the CPU: the C++ schemas are the Python contract, the
results do not depend on the thread count, and direct operator calls check their input.
(Values and gradients against the float64 reference: tests/ops/test_batch_norm.py.)"""

import pytest
import torch

import importlib

bn = importlib.import_module("divco.ops.batch_norm")  # the module (divco.ops.batch_norm is the function)


@pytest.mark.parametrize(
    "base,schema", [("batch_norm", bn.BATCH_NORM_SCHEMA), ("batch_norm_backward", bn.BATCH_NORM_BACKWARD_SCHEMA)]
)
def test_schemas_equal_the_python_contract(ops, base, schema):
    op = getattr(ops, bn.op_name(base, "native")).default
    assert str(op._schema) == str(torch._C.parse_schema(bn.qualified_name(base, "native") + schema))
    assert torch._C._dispatch_has_kernel_for_dispatch_key(bn.qualified_name(base, "native"), "CPU")


def run_forward_backward(x, residual, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt).requires_grad_()
    residual = residual.contiguous(memory_format=fmt).requires_grad_()
    w = torch.linspace(0.5, 2.0, x.shape[1], requires_grad=True)
    b = torch.linspace(-1.0, 1.0, x.shape[1], requires_grad=True)
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    out = bn.batch_norm(x, w, b, rm, rv, training=True, residual=residual, activation="relu", backend="cpu")
    grads = torch.autograd.grad(out, (x, w, b, residual), torch.ones_like(out).mul_(0.5) + x.detach())
    return (out, rm, rv) + grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_results_do_not_depend_on_the_thread_count(native, channels_last, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 40, 9, 9, generator=g) * 3 + 2).to(dtype)
    residual = torch.randn(16, 40, 9, 9, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_forward_backward(x, residual, channels_last)
        torch.set_num_threads(max(2, threads))
        many = run_forward_backward(x, residual, channels_last)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_backward_operator_checks_its_input(ops):
    x = torch.randn(2, 3, 4, 4)
    mean, var = torch.zeros(3), torch.ones(3)
    backward = ops.batch_norm_backward_native
    with pytest.raises(ValueError, match="needs the forward's output"):
        backward(torch.randn_like(x), x, None, None, mean, var, True, 1e-5, True, False)
    with pytest.raises(ValueError, match=r"grad_out must have x's shape"):
        backward(torch.randn(2, 3, 4, 5), x, None, None, mean, var, True, 1e-5, False, False)
    with pytest.raises(ValueError, match=r"mean must be float32 \[C\] = \[3\]"):
        backward(torch.randn_like(x), x, None, None, torch.zeros(4), var, True, 1e-5, False, False)
    with pytest.raises(ValueError, match="eval mode needs running_mean"):
        ops.batch_norm_native(x, None, None, None, None, None, False, 1e-5, False)
    with pytest.raises(ValueError, match="more than one value per channel"):
        ops.batch_norm_native(torch.randn(1, 3, 1, 1), None, None, None, None, None, True, 1e-5, False)


def test_grad_out_in_another_layout_is_accepted(ops):
    """Autograd may hand backward a gradient in NCHW for a channels_last x (and vice versa)."""
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    g = torch.randn(2, 3, 4, 4)
    a = ops.batch_norm_backward_native(g, x, None, None, mean, var, True, 1e-5, False, False)
    b = ops.batch_norm_backward_native(g.to(memory_format=torch.channels_last), x, None, None, mean, var, True, 1e-5,
                                       False, False)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["squares_past_float32", "rows_far_apart", "offset_1e18"])
def test_statistics_of_extreme_magnitudes(native, channels_last, case):
    """Every float32 input whose variance fits float32, against float64: differences of 2e19
    (their float32 square overflows, the variance 1e38 does not), rows whose means lie 1e18
    apart (each row shifted by its own pivot, merged with Chan's formula), and a spread of
    1e12 on an offset of 1e18 (the output centred first: x·scale - mean·scale cancels)."""
    g = torch.Generator().manual_seed(0)
    N, C, H, W = 6, 5, 7, 9
    if case == "squares_past_float32":
        x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).sign() * 1e19 + 1e18
    elif case == "rows_far_apart":
        x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 1e6
        x += torch.arange(N, dtype=torch.float64).view(N, 1, 1, 1) * 1e18
    else:
        x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 1e12 + 1e18
    x = x.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = bn.batch_norm(x, None, None, None, None, training=True, backend="cpu")
    x64 = x.double()
    mean = x64.mean((0, 2, 3), keepdim=True)
    std = x64.var((0, 2, 3), correction=0, keepdim=True).add(1e-5).sqrt()
    expected = (x64 - mean) / std
    # the float32 mean carries up to half an ulp of error: its share of the tolerance
    mean_rounding = (mean.float().double() - mean).abs() / std
    assert torch.isfinite(out).all()
    assert ((out.double() - expected).abs() <= 1e-3 + 1.01 * mean_rounding + 1e-4 * expected.abs()).all()
