"""The CUDA batch_norm kernels (GPU machines only): values against the CPU float64 reference
at model shapes, no host synchronisation, CUDA-graph capture, and the Triton kernels alike."""

import pytest
import torch

import importlib

bn = importlib.import_module("divco.ops.batch_norm")  # the module (divco.ops.batch_norm is the function)
from divco.ops.reference import batch_norm as reference

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]


def make(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(64, 128, 32, 32), (128, 64, 8, 8), (3, 2048, 5, 7)], ids=["wrn", "resnet", "wide"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_shapes_match_the_reference(backend, shape, channels_last, dtype):
    x, r = make(shape, dtype, channels_last)
    C = shape[1]
    w, b = torch.randn(C), torch.randn(C)
    xd = x.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    expected = reference(xd, wd, bd, None, None, True, 0.1, 1e-5, r.double(), "relu")
    g = torch.randn(shape).to(dtype)
    grads = torch.autograd.grad(expected, (xd, wd, bd), g.double())
    xc = x.cuda().requires_grad_()
    wc, bc = w.cuda().requires_grad_(), b.cuda().requires_grad_()
    out = bn.batch_norm(xc, wc, bc, None, None, training=True, residual=r.cuda(), activation="relu", backend=backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    got = torch.autograd.grad(out, (xc, wc, bc), g.cuda().contiguous(memory_format=fmt))
    tol = 2e-4 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(out.double().cpu(), expected.detach(), rtol=tol, atol=tol * 5)
    for a, e in zip(got, grads):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.double().cpu(), e, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_synchronisation_and_graph_capture(backend):
    x, r = make((8, 16, 6, 6), torch.float32, True)
    x, r = x.cuda().requires_grad_(), r.cuda()
    w, b = torch.ones(16, device="cuda", requires_grad=True), torch.zeros(16, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")

    def step():
        out = bn.batch_norm(x, w, b, rm, rv, training=True, residual=r, activation="relu", backend=backend)
        out.sum().backward()
        return out

    step()  # warm-up (Triton compiles, the allocator fills)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x.grad = None
        with torch.cuda.graph(graph):
            out = bn.batch_norm(x.detach(), w.detach(), b.detach(), rm, rv, training=True, residual=r,
                                activation="relu", backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    expected = torch.relu(torch.nn.functional.batch_norm(x.detach(), None, None, None, None, True, 0.1, 1e-5) + r)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
