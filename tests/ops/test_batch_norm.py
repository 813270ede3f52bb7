"""divco.ops.batch_norm: every backend against the float64 reference (values, every gradient,
running statistics), both memory formats, three dtypes, residual/activation on and off,
train and eval; torch.library registration (opcheck, torch.compile) and the input checks."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tile_shapes import examples, field

from divco.ops import backends
from divco.ops.batch_norm import batch_norm
from divco.ops.reference import batch_norm as reference_batch_norm
from divco.ops.triton_backend import kernels_interpreted

bn_module = importlib.import_module("divco.ops.batch_norm")  # the module (divco.ops.batch_norm is the function)

INTERPRETED = kernels_interpreted()
SCALE = int(os.environ.get("DIVCO_TEST_EXAMPLES_SCALE", "1"))


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and not INTERPRETED):
        return torch.device("cuda")
    return torch.device("cpu")


def available(backend: str) -> bool:
    device = device_for(backend)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    if backend in ("cpu", "cuda") and not bn_module.native_available()[0]:
        return False
    return backends.backend_status(backend, device)[0]


def backend_params(*names: str):
    params = []
    for name in names:
        marks = [pytest.mark.skipif(not available(name), reason=f"backend {name!r} not available here")]
        if device_for(name).type == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


FUSED = ("triton", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Relative tolerance per dtype (outputs and gradients are rounded to the dtype).
TOLERANCE = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
#: Shapes per backend: the Triton interpreter runs every program in Python.
LIMITS = {
    "triton": dict(n=3, c=6, hw=5) if INTERPRETED else dict(n=16, c=256, hw=16),
    "cpu": dict(n=8, c=64, hw=12),
    "cuda": dict(n=16, c=256, hw=16),
}
EXAMPLES = {backend: examples(count * SCALE)  # capped on a GPU
            for backend, count in {"triton": 10 if INTERPRETED else 60, "cpu": 40, "cuda": 60}.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOLERANCE[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


class Case:
    """One draw: inputs in the kernel dtype, and the float64 reference run on the same values."""

    def __init__(self, backend, shape, dtype, channels_last, training, residual, relu, affine, seed, mean_shift=0.0):
        self.description = (f"Case({backend!r}, {shape}, {dtype}, channels_last={channels_last}, training={training}, "
                            f"residual={residual}, relu={relu}, affine={affine}, seed={seed}, mean_shift={mean_shift})")
        g = torch.Generator().manual_seed(seed)
        N, C, H, W = shape
        device = device_for(backend)
        self.dtype, self.training, self.relu = dtype, training, relu
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean_shift).to(dtype)
        r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
        self.grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        w = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
        b = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
        rm = torch.randn(C, generator=g, dtype=torch.float64)
        rv = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def leaf(t, dt=None, on=device):
            if t is None:
                return None
            t = t.to(dtype=dt or t.dtype, device=on)
            if t.dim() == 4:
                t = t.contiguous(memory_format=fmt)
            return t.clone().requires_grad_()

        # float64 reference on the values the kernel sees (rounded to the kernel dtype)
        self.ref_inputs = [leaf(t, torch.float64, "cpu") for t in (x, w, b, r)]
        self.ref_stats = [rm.clone(), rv.clone()]
        self.inputs = [leaf(t, dt) for t, dt in ((x, None), (w, torch.float32), (b, torch.float32), (r, None))]
        self.stats = [rm.float().to(device), rv.float().to(device)]
        self.backend = backend

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return self.description

    def run_reference(self):
        x, w, b, r = self.ref_inputs
        out = reference_batch_norm(x, w, b, *self.ref_stats, self.training, 0.1, 1e-5, r, "relu" if self.relu else None)
        return out, self.grads(out, self.ref_inputs, self.grad_out.double())

    def run(self):
        x, w, b, r = self.inputs
        out = batch_norm(x, w, b, *self.stats, training=self.training, momentum=0.1, eps=1e-5, residual=r,
                         activation="relu" if self.relu else None, backend=self.backend)
        return out, self.grads(out, self.inputs, self.grad_out.to(out.device))

    @staticmethod
    def grads(out, inputs, grad_out):
        leaves = [t for t in inputs if t is not None]
        got = iter(torch.autograd.grad(out, leaves, grad_out))
        return [None if t is None else next(got) for t in inputs]

    def check(self):
        expected, expected_grads = self.run_reference()
        out, grads = self.run()
        assert out.dtype == self.dtype and out.shape == expected.shape
        assert out.stride() == self.inputs[0].stride(), "the output keeps x's memory format"
        assert_close(out.cpu(), expected.detach(), self.dtype, "out")
        # ReLU's derivative is undefined at 0: where the float64 pre-activation of an element is
        # (numerically) 0 - a channel whose values round to one value has x̂ = 0 exactly - the
        # reference's 1e-13 and the kernel's exact 0 take different sides of the kink, and in
        # training that element's gradient reaches its whole channel. Such channels are not compared.
        kink = (expected.detach().abs() < 1e-9).transpose(0, 1).flatten(1).any(1) if self.relu else None
        for name, got, want in zip(("x", "weight", "bias", "residual"), grads, expected_grads):
            if want is not None:
                got = got.cpu().clone()
                if kink is not None and kink.any():
                    channel = (slice(None), kink) if got.dim() == 4 else (kink,)
                    got[channel] = want[channel].to(got.dtype)
                # x and residual gradients are rounded to x's dtype; weight and bias are float32
                dtype = self.dtype if name in ("x", "residual") else torch.float32
                assert_close(got, want, dtype, f"grad {name}")
        for name, got, want in zip(("running_mean", "running_var"), self.stats, self.ref_stats):
            torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@st.composite
def cases(draw, backend):
    lim = LIMITS[backend]
    training = draw(field("batch_norm", "training", st.booleans()))
    N = draw(field("batch_norm", "N", st.integers(1, lim["n"])))
    H = draw(field("batch_norm", "H", st.integers(1, lim["hw"])))
    W = draw(field("batch_norm", "W", st.integers(1, lim["hw"])))
    if training and N * H * W == 1:
        W = 2  # training needs two values per channel (eval takes N·H·W = 1)
    return Case(
        backend,
        (N, draw(field("batch_norm", "C", st.integers(1, lim["c"]))), H, W),
        draw(field("batch_norm", "dtype", st.sampled_from(sorted(DTYPES)).map(DTYPES.get))),
        channels_last=draw(field("batch_norm", "channels_last", st.booleans())),
        training=training,
        residual=draw(field("batch_norm", "residual", st.booleans())),
        relu=draw(field("batch_norm", "relu", st.booleans())),
        affine=draw(field("batch_norm", "affine", st.booleans())),
        seed=draw(st.integers(0, 2**16)),
        mean_shift=draw(st.sampled_from([0.0, 0.0, 30.0])),
    )


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_backend_matches_float64_reference(backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(backend))
    def check(case):
        case.check()

    check()


@pytest.mark.parametrize("backend", backend_params(*FUSED))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_option_combination(backend, channels_last, training):
    """Residual x ReLU x affine exhaustively on one small shape (hypothesis samples them)."""
    for residual in (False, True):
        for relu in (False, True):
            for affine in (False, True):
                case = Case(backend, (2, 3, 3, 2), torch.float32, channels_last, training, residual, relu, affine, 7)
                case.check()


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda"))
@pytest.mark.parametrize(
    "shape", [(2, 2048, 2, 2), (1, 3, 64, 64), (64, 4, 2, 2), (5, 40, 7, 9)], ids=["wide", "tall", "batch", "odd"]
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_native_large_shapes(backend, shape, channels_last):
    """The issue's extremes: C up to 2048, H·W up to 64x64, N up to 64, odd sizes (block tails)."""
    Case(backend, shape, torch.float32, channels_last, True, True, True, True, seed=1, mean_shift=5.0).check()


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_eval_takes_one_value_per_channel(backend):
    Case(backend, (1, 4, 1, 1), torch.float32, False, False, True, True, True, seed=3).check()


def test_torch_backend_is_f_batch_norm():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    r = torch.randn_like(x)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    out = batch_norm(x, None, None, rm, rv, training=True, momentum=0.3, residual=r, activation="relu", backend="torch")
    expected = torch.relu(F.batch_norm(x, rm2, rv2, None, None, True, 0.3, 1e-5) + r)
    assert torch.equal(out, expected) and torch.equal(rm, rm2) and torch.equal(rv, rv2)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_running_stats_follow_f_batch_norm(backend):
    """Unbiased variance, momentum; float32 running stats as nn.BatchNorm2d keeps them."""
    device = device_for(backend)
    x = torch.randn(6, 5, 3, 4, device=device) * 3 + 1
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    for _ in range(3):
        batch_norm(x, None, None, rm, rv, training=True, momentum=0.25, backend=backend)
        F.batch_norm(x, rm2, rv2, None, None, True, 0.25, 1e-5)
    torch.testing.assert_close(rm, rm2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_low_precision_parameters_and_strided_input(backend):
    """A model cast to bfloat16 (bf16 weight and running stats) and a non-contiguous x."""
    device = device_for(backend)
    x = torch.randn(4, 6, 3, 3, device=device).to(torch.bfloat16)[:, ::2]
    w = torch.randn(3, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(3, device=device, dtype=torch.bfloat16, requires_grad=True)
    rm, rv = torch.zeros(3, device=device, dtype=torch.bfloat16), torch.ones(3, device=device, dtype=torch.bfloat16)
    rm2, rv2 = rm.float(), rv.float()
    out = batch_norm(x, w, b, rm, rv, training=True, activation="relu", backend=backend)
    expected = torch.relu(F.batch_norm(x.float(), rm2, rv2, w.float(), b.float(), True, 0.1, 1e-5))
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16
    assert rm.dtype == torch.bfloat16
    torch.testing.assert_close(rm.float(), rm2, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rv.float(), rv2, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_residual_gradient_without_relu_is_grad_out(backend):
    device = device_for(backend)
    x = torch.randn(2, 3, 2, 2, device=device, requires_grad=True)
    r = torch.randn(2, 3, 2, 2, device=device, requires_grad=True)
    out = batch_norm(x, None, None, None, None, residual=r, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(r.grad, g)


# -- torch.library: opcheck, torch.compile --------------------------------------------------------


def op_suffix(backend: str) -> str:
    return "triton" if backend == "triton" else "native"


def opcheck_samples(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 3, generator=g).to(device)
    w, b = torch.randn(4, generator=g).to(device), torch.randn(4, generator=g).to(device)
    rm, rv = torch.randn(4, generator=g).to(device), (torch.rand(4, generator=g) + 0.5).to(device)
    r = torch.randn(3, 4, 2, 3, generator=g).to(device)
    cl = x.to(memory_format=torch.channels_last)
    return [
        (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), None, None,
         r.clone().requires_grad_(), True, 1e-5, True),
        (cl.clone().requires_grad_(), None, None, rm, rv, None, False, 1e-3, False),
        (x.to(torch.bfloat16).requires_grad_(), w, b, rm, rv, r.to(torch.bfloat16), False, 1e-5, True),
        (cl.to(torch.float16), w, None, None, None, None, True, 1e-5, False),
    ]


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_opcheck(backend):
    device = device_for(backend)
    forward = getattr(torch.ops.divco, bn_module.op_name("batch_norm", op_suffix(backend)))
    backward = getattr(torch.ops.divco, bn_module.op_name("batch_norm_backward", op_suffix(backend)))
    for args in opcheck_samples(device):
        torch.library.opcheck(forward, args)
        x, w = args[0].detach(), None if args[1] is None else args[1].detach()
        with torch.no_grad():
            out, mean, var = forward(x, *args[1:])
        stats = (mean, var) if args[6] else (args[3], args[4])
        torch.library.opcheck(backward, (torch.randn_like(out), x, out, w, *stats, args[6], args[7], args[8], True))


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_compiles_without_graph_breaks(backend):
    device = device_for(backend)
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, device=device)
    w, b = torch.randn(3, device=device), torch.randn(3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    rm2, rv2 = rm.clone(), rv.clone()

    def block(x, rm, rv):
        return batch_norm(x, w, b, rm, rv, training=True, residual=r, activation="relu", backend=backend)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, rm, rv)
    out.sum().backward()
    expected = block(x.detach(), rm2, rv2)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_schemas_are_the_native_contract():
    """csrc/divco/ops/registration.cpp spells these (tests/native/test_batch_norm_cpu.py checks it)."""
    assert bn_module.BATCH_NORM_SCHEMA.startswith("(Tensor x, Tensor? weight, Tensor? bias")
    assert bn_module.qualified_name("batch_norm_backward", "triton") == "divco::batch_norm_backward_triton"


# -- bad input --------------------------------------------------------------------------------------


def bad_calls():
    x = torch.randn(2, 3, 4, 4)
    v = torch.zeros(3)
    return [
        (dict(x=torch.randn(2, 3, 4)), "4-D"),
        (dict(x=torch.randn(2, 3, 4, 4).int()), "float32, bfloat16, float16 or float64"),
        (dict(x=torch.randn(0, 3, 4, 4)), "must not be empty"),
        (dict(weight=torch.ones(4)), r"weight must have shape \[C\] = \[3\]"),
        (dict(bias=torch.ones(3, 1)), r"bias must have shape"),
        (dict(running_mean=torch.zeros(2), running_var=torch.ones(2)), "running_mean must have shape"),
        (dict(running_mean=v, running_var=None), "both be tensors or both be None"),
        (dict(training=False), "running_mean and running_var are required"),
        (dict(x=torch.randn(1, 3, 1, 1)), r"more than one value per channel"),
        (dict(residual=torch.randn(2, 3, 4, 5)), "residual must have x's shape"),
        (dict(residual=torch.randn(2, 3, 4, 4, dtype=torch.float64)), "residual must have x's dtype"),
        (dict(residual=torch.randn(2, 3, 4, 4, device="meta")), "residual is on meta"),
        (dict(weight=torch.ones(3, device="meta")), "weight is on meta"),
        (dict(activation="gelu"), "activation must be one of"),
        (dict(weight=torch.ones(3, dtype=torch.int64)), "weight must be floating point"),
        (dict(x=x, backend="nope"), "backend"),
    ]


@pytest.mark.parametrize("kwargs,message", bad_calls(), ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_bad_input_is_a_value_error(kwargs, message):
    call = dict(x=torch.randn(2, 3, 4, 4), weight=None, bias=None, running_mean=None, running_var=None)
    call.update(kwargs)
    x = call.pop("x")
    with pytest.raises(ValueError, match=message):
        batch_norm(x, call.pop("weight"), call.pop("bias"), call.pop("running_mean"), call.pop("running_var"), **call)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_float64_needs_the_torch_backend(backend):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device_for(backend))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        batch_norm(x, None, None, None, None, backend=backend)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_operators_refuse_what_the_kernels_cannot_take(backend):
    op = getattr(torch.ops.divco, bn_module.op_name("batch_norm", op_suffix(backend)))
    device = device_for(backend)
    x = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="float32"):
        op(x.double(), None, None, None, None, None, True, 1e-5, False)
    with pytest.raises(ValueError, match="contiguous"):
        op(x.transpose(2, 3), None, None, None, None, None, True, 1e-5, False)
    with pytest.raises(ValueError, match="float32"):
        op(x, torch.ones(3, device=device, dtype=torch.float64), None, None, None, None, True, 1e-5, False)
