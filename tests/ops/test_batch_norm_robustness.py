"""divco.ops.batch_norm on the inputs that broke it: odd strides of size-1 dims, strided [C]
vectors, |x| ~ 1e18, grids past CUDA's 65535 per axis, zero gradients nobody uses, host reads
for momentum=None, and the one validation rule every backend applies."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from divco.ops.batch_norm import batch_norm
from divco.ops.triton_backend import TRITON_ERROR

from backend_params import backend_params, device_for

bn_module = importlib.import_module("divco.ops.batch_norm")

FUSED = ("triton", "cpu", "cuda")
ALL = ("torch",) + FUSED


class OpLog(TorchDispatchMode):
    """Every operator dispatched below autograd, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def reference(x, weight=None, bias=None, rm=None, rv=None, training=True):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return F.batch_norm(d(x), d(rm), d(rv), d(weight), d(bias), training, 0.1, 1e-5)


def odd_stride_inputs():
    """Tensors PyTorch calls contiguous (NCHW or channels_last) whose size-1 dims carry odd strides."""
    nchw = torch.randn(2, 3, 1, 5).transpose(2, 3)  # shape [2, 3, 5, 1], stride(3) = 5
    assert nchw.is_contiguous() and nchw.stride(3) == 5
    base = torch.randn(30)
    channels_last = base.as_strided((2, 3, 5, 1), (15, 1, 3, 99))  # W = 1 with stride 99
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    tall = torch.randn(2, 1, 4, 3).as_strided((2, 1, 4, 3), (12, 77, 3, 1))  # C = 1 with stride 77
    return {"nchw": nchw, "channels_last": channels_last, "one_channel": tall}


@pytest.mark.parametrize("backend", backend_params(*FUSED))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "one_channel"])
def test_odd_strides_of_size_one_dims(backend, layout):
    x = odd_stride_inputs()[layout].to(device_for(backend))
    r = torch.randn(x.shape, device=x.device)
    x.requires_grad_()
    out = batch_norm(x, None, None, None, None, residual=r, activation="relu", backend=backend)
    expected = torch.relu(reference(x.detach().cpu()) + r.cpu().double())
    torch.testing.assert_close(out.detach().cpu().double(), expected, rtol=1e-4, atol=1e-4)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn(x.shape)
    (grad,) = torch.autograd.grad(out, x, g.to(x.device))
    x64 = x.detach().cpu().double().requires_grad_()
    (expected_grad,) = torch.autograd.grad(torch.relu(reference(x64) + r.cpu().double()), x64, g.double())
    torch.testing.assert_close(grad.cpu().double(), expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_channel_vectors(backend, training):
    """weight[::2] and friends: the kernels must not read them as if their stride were 1."""
    device = device_for(backend)
    x = torch.randn(3, 4, 3, 3, device=device) * 2 + 1
    w, b = torch.randn(8, device=device)[::2], torch.randn(8, device=device)[::2]
    rm, rv = torch.randn(8, device=device)[::2], (torch.rand(8, device=device) + 0.5)[::2]
    out = batch_norm(x, w, b, rm, rv, training=training, backend=backend)
    rm2, rv2 = rm.cpu().clone(), rv.cpu().clone()
    expected = reference(x.cpu(), w.cpu(), b.cpu(), rm2.double(), rv2.double(), training)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("scale,shift", [(1e18, 0.0), (1e18, 3e18), (1e19, 1e18), (1.0, 1e4), (1e-20, 1e-18)],
                         ids=["huge", "huge_shifted", "squares_past_float32", "large_mean", "tiny"])
def test_statistics_of_extreme_magnitudes(backend, channels_last, scale, shift):
    """Every float32 input whose variance fits float32: a sum of squares of 400 values of 1e18
    overflows (the output was 0 where float64 gives +-3)."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 10, 10, generator=g, dtype=torch.float64) * scale + shift).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    out = batch_norm(x.to(device), None, None, rm, rv, training=True, backend=backend)
    rm2, rv2 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected = F.batch_norm(x.double(), rm2, rv2, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rm.cpu().double(), rm2, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(rv.cpu().double(), rv2, rtol=1e-4, atol=0.0)


# -- grids ----------------------------------------------------------------------------------------


class GridRecorder:
    """Stands in for torch.library.wrap_triton: records each launch's grid, runs nothing."""

    def __init__(self):
        self.grids: list[tuple[str, tuple[int, ...]]] = []

    def __call__(self, kernel):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", str(kernel))

        def launch(grid):
            self.grids.append((name, tuple(grid)))
            return lambda *args, **kwargs: None

        return type("Launcher", (), {"__getitem__": lambda _, grid: launch(grid)})()


LARGE_SHAPES = [
    ((70000, 64, 1, 1), torch.contiguous_format),  # N > 65535
    ((70000, 3, 2, 2), torch.channels_last),
    ((2, 64, 1024, 1024), torch.channels_last),  # H·W tiles > 65535
    ((1, 8, 4096, 4096), torch.contiguous_format),
]


@pytest.mark.skipif(bool(TRITON_ERROR), reason="Triton is not importable")
@pytest.mark.parametrize("shape,fmt", LARGE_SHAPES, ids=lambda v: str(v) if isinstance(v, tuple) else None)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_grids_stay_within_cuda_limits(monkeypatch, shape, fmt, training):
    """The grids the Triton launchers would launch for such shapes, forward and backward (meta
    tensors: nothing is allocated or run)."""
    recorder = GridRecorder()
    monkeypatch.setattr(bn_module, "wrap_triton", recorder)
    x = torch.empty(shape, device="meta").contiguous(memory_format=fmt)
    stats = torch.empty(shape[1], device="meta")
    out, mean, var = bn_module.batch_norm_triton_impl(x, stats, stats, stats, stats, x, training, 1e-5, True)
    saved = (mean, var) if training else (stats, stats)
    bn_module.batch_norm_backward_triton_impl(x, x, out, stats, *saved, training, 1e-5, True, True)
    assert len(recorder.grids) == (6 if training else 4)
    for name, grid in recorder.grids:
        assert 1 <= len(grid) <= 3
        for axis, programs in enumerate(grid):
            assert 1 <= programs <= (2**31 - 1 if axis == 0 else 65535), (name, grid)
    c_tiles, chunks, per_chunk = bn_module.reduction_grid(shape, *bn_module.tile_shape(x))
    assert chunks * c_tiles <= 2 * bn_module.REDUCTION_PROGRAMS, "the reduction splits over N·H·W, bounded"


@pytest.mark.skipif(bool(TRITON_ERROR), reason="Triton is not importable")
def test_triton_reduction_splits_positions_not_only_the_batch():
    """WRN-28-10 stage 1 divided in 4 ([128, 4·80, 32, 32]), channels_last: the batch alone gave
    320 programs of 64 tiles each; split over N·H·W the programs approach REDUCTION_PROGRAMS."""
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = torch.empty(128, 320, 32, 32, device="meta").contiguous(memory_format=fmt)
        c_tiles, chunks, per_chunk = bn_module.reduction_grid(x.shape, *bn_module.tile_shape(x))
        assert c_tiles * chunks >= bn_module.REDUCTION_PROGRAMS * 3 // 4
        assert per_chunk <= 32
    one_image = torch.empty(1, 4, 256, 256, device="meta")  # a single large image: still many programs
    assert math.prod(bn_module.reduction_grid(one_image.shape, *bn_module.tile_shape(one_image))[:2]) >= 64


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_runs_a_batch_split_across_chunks(backend):
    """More units than programs per channel tile: every chunk boundary inside one sample's H·W."""
    device = device_for(backend)
    x = torch.randn(3, 2, 40, 40, device=device) * 5 + 2
    old = bn_module.REDUCTION_PROGRAMS
    try:
        bn_module.REDUCTION_PROGRAMS = 5  # 3 samples x 4 H·W tiles of 512 -> chunks of 3 units
        out = batch_norm(x, None, None, None, None, backend=backend)
    finally:
        bn_module.REDUCTION_PROGRAMS = old
    torch.testing.assert_close(out.cpu().double(), reference(x.cpu()), rtol=1e-4, atol=1e-4)


# -- autograd: no zero gradients ------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_backward_materialises_no_zero_gradients(backend):
    """The statistics outputs (mean, var) are never used: their gradients must not be filled."""
    device = device_for(backend)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    out = batch_norm(x, w, None, torch.zeros(3, device=device), torch.ones(3, device=device), residual=r,
                     activation="relu", backend=backend)
    with OpLog() as log:
        out.backward(torch.ones_like(out))
    fills = [op for op in log.ops if op in ("zeros", "zeros_like", "fill_", "fill", "zero_", "new_zeros")]
    assert fills == [], log.ops


# -- momentum=None: no host read -------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(*ALL))
def test_cumulative_average_reads_nothing_back(backend):
    device = device_for(backend)
    x = torch.randn(4, 3, 3, 3, device=device) * 2 + 1
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    batches = torch.tensor(3, device=device)
    with OpLog() as log:
        batch_norm(x, None, None, rm, rv, momentum=None, num_batches_tracked=batches, backend=backend)
    assert "_local_scalar_dense" not in log.ops and "item" not in log.ops, log.ops
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    F.batch_norm(x.cpu(), rm2, rv2, None, None, True, 1 / 3, 1e-5)
    torch.testing.assert_close(rm.cpu(), rm2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.cpu(), rv2, rtol=1e-5, atol=1e-6)


# -- one validation rule ----------------------------------------------------------------------------


BAD_HYPERPARAMETERS = [
    (dict(momentum=float("nan")), "momentum must be a number in \\[0, 1\\] or None"),
    (dict(momentum=-0.1), "momentum must be a number in \\[0, 1\\] or None .*; got -0.1"),
    (dict(momentum=1.5), "momentum must be a number in \\[0, 1\\] or None .*; got 1.5"),
    (dict(eps=float("nan")), "eps must be a finite number > 0; got nan"),
    (dict(eps=0.0), "eps must be a finite number > 0; got 0.0"),
    (dict(eps=-1e-5), "eps must be a finite number > 0"),
    (dict(eps=float("inf")), "eps must be a finite number > 0"),
    (dict(momentum=None), "momentum=None .* needs num_batches_tracked"),
    (dict(running_var_dtype=torch.float64), r"running_var must be float32 or x's dtype \(torch.float32\); "
                                            r"got torch.float64"),
    (dict(running_mean_dtype=torch.float16), "running_mean must be float32 or x's dtype"),
    (dict(weight_dtype=torch.float64), "weight must be float32 or x's dtype"),
]


@pytest.mark.parametrize("backend", backend_params(*ALL))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad,message", BAD_HYPERPARAMETERS, ids=lambda v: str(v)[:30] if isinstance(v, dict) else None)
def test_every_backend_refuses_the_same_input(backend, training, bad, message):
    if bad == dict(momentum=None) and not training:
        pytest.skip("eval does not update the running statistics")
    device = device_for(backend)
    bad = dict(bad)
    x = torch.randn(2, 3, 4, 4, device=device)
    rm = torch.zeros(3, device=device, dtype=bad.pop("running_mean_dtype", torch.float32))
    rv = torch.ones(3, device=device, dtype=bad.pop("running_var_dtype", torch.float32))
    w = torch.ones(3, device=device, dtype=bad.pop("weight_dtype", torch.float32))
    with pytest.raises(ValueError, match=message):
        batch_norm(x, w, None, rm, rv, training=training, backend=backend, **bad)


@pytest.mark.parametrize("backend", backend_params(*ALL))
def test_every_backend_takes_what_f_batch_norm_takes(backend):
    """The accepted side of the rule: [C] tensors of x's dtype or float32, momentum 0 and 1."""
    device = device_for(backend)
    x = torch.randn(2, 3, 4, 4, device=device).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):
        for momentum in (0.0, 1.0):
            rm, rv = torch.zeros(3, device=device, dtype=dtype), torch.ones(3, device=device, dtype=dtype)
            batch_norm(x, rm.clone(), None, rm, rv, momentum=momentum, backend=backend)
            assert rm.dtype == dtype
