"""The public API: what cotrain_loss returns, backend choice, torch.compile, a model end to end."""

import pytest
import torch
from backend_params import backend_params, device_for
from torch import nn

import divco.ops as ops
from divco.nn import BranchConv2d, BranchLinear
from divco.ops import backends


def problem(N=6, S=3, K=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, S, K, generator=g).requires_grad_(), torch.randint(0, K, (N,), generator=g)


@pytest.mark.parametrize("backend", backend_params())
def test_result_fields(backend):
    logits, target = problem()
    logits = logits.detach().to(device_for(backend)).requires_grad_()
    out = ops.cotrain_loss(logits, target.to(logits.device), backend=backend)
    assert isinstance(out, ops.CotrainLoss)
    assert out.loss.shape == () and out.loss.dtype == torch.float32 and out.loss.requires_grad
    assert out.ce.shape == (3,) and not out.ce.requires_grad
    assert out.cot.shape == () and not out.cot.requires_grad
    assert out.ensemble.shape == (6, 7) and not out.ensemble.requires_grad
    assert out.correct.shape == (4,) and out.correct.dtype == torch.int64
    torch.testing.assert_close(out.loss, out.ce.sum() + 0.5 * out.cot)


@pytest.mark.parametrize("backend", backend_params())
def test_weight_tensor_equals_number_and_gets_a_gradient(backend):
    device = device_for(backend)
    logits, target = problem()
    logits, target = logits.detach().to(device), target.to(device)
    weight = torch.tensor(0.3, device=device, requires_grad=True)
    by_tensor = ops.cotrain_loss(logits, target, weight=weight, backend=backend)
    by_number = ops.cotrain_loss(logits, target, weight=0.3, backend=backend)
    torch.testing.assert_close(by_tensor.loss, by_number.loss)
    by_tensor.loss.backward()
    torch.testing.assert_close(weight.grad, by_tensor.cot)  # d loss / d weight = J


@pytest.mark.parametrize("backend", backend_params())
def test_soft_targets_that_require_grad(backend):
    device = device_for(backend)
    logits, _ = problem()
    soft = torch.softmax(torch.randn(6, 7), -1).to(device).requires_grad_()
    if backend == "torch":
        ops.cotrain_loss(logits.detach().to(device), soft, backend=backend).loss.backward()
        assert soft.grad is not None
    else:
        with pytest.raises(ValueError, match="does not differentiate the soft targets"):
            ops.cotrain_loss(logits.detach().to(device), soft, backend=backend)


def test_default_backend_and_override(monkeypatch):
    monkeypatch.delenv("DIVCO_BACKEND", raising=False)
    available = ops.available_backends("cpu")
    assert available[0] == ("cpu" if backends.native_status()[0] else "torch")
    assert set(available) <= set(ops.BACKENDS) and "torch" in available
    assert backends.resolve_backend(None, torch.device("cpu"), torch.float64) == "torch"
    monkeypatch.setenv("DIVCO_BACKEND", "torch")
    assert backends.resolve_backend(None, torch.device("cpu"), torch.float32) == "torch"
    # an explicit argument wins over the environment
    assert backends.resolve_backend("torch", torch.device("cpu"), torch.float32) == "torch"


def test_backends_agree_with_each_other():
    logits, target = problem(N=9, S=4, K=11, seed=3)
    results = {}
    for backend in ops.available_backends(logits.device):
        z = logits.detach().clone().requires_grad_()
        out = ops.cotrain_loss(z, target, weight=0.7, kind="js", temperature=2.0, backend=backend)
        out.loss.backward()
        results[backend] = (out.loss.detach(), z.grad)
    loss0, grad0 = results["torch"]
    for loss, grad in results.values():
        torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grad0, rtol=1e-5, atol=1e-7)


def with_compiler(compiler, *backends):
    params = backend_params(*backends)
    return [pytest.param(*p.values, compiler, marks=p.marks, id=f"{p.id}-{compiler}") for p in params]


@pytest.mark.parametrize(
    "backend, compiler",
    with_compiler("aot_eager", "torch", "triton", "cpu") + with_compiler("inductor", "triton", "cpu"),
)
def test_compiles_without_graph_breaks(backend, compiler):
    """fullgraph=True: no graph break; a new weight value does not recompile.

    "aot_eager" checks capture, fake kernels and the autograd formulas cheaply; inductor runs
    for the fused operators only (it compiles C++ for the surrounding graph, and compiling the
    whole plain-PyTorch loss takes over a minute on a 2-core machine)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)

    @torch.compile(fullgraph=True, backend=counter)
    def step(logits, target, weight):
        out = ops.cotrain_loss(logits, target, weight=weight, kind="js", temperature=2.0, backend=backend)
        return out.loss, out.correct

    logits, target = problem()
    device = device_for(backend)  # a GPU machine compiles the Triton backend for CUDA tensors
    for w in (0.1, 0.9):
        weight = torch.tensor(w, device=device)
        z = logits.detach().clone().to(device).requires_grad_()
        loss, correct = step(z, target.to(device), weight)
        loss.backward()
        z_ref = logits.detach().clone().requires_grad_()
        ref = ops.cotrain_loss(z_ref, target, weight=w, temperature=2.0, backend="torch")
        ref.loss.backward()
        torch.testing.assert_close(loss.cpu(), ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z.grad.cpu(), z_ref.grad, rtol=1e-5, atol=1e-7)
        assert correct.tolist() == ref.correct.tolist()
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
@pytest.mark.gpu
def test_compiles_on_gpu_and_captures_in_a_cuda_graph(backend):
    """On a GPU the Triton operator is a triton_op: inductor sees the kernel itself.
    mode="reduce-overhead" captures the step in a CUDA graph (no host synchronisation)."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, mode="reduce-overhead")
    def step(logits, target, weight):
        return ops.cotrain_loss(logits, target, weight=weight, backend=backend).loss

    logits, target = problem(N=64, S=4, K=1000)
    logits, target = logits.detach().cuda(), target.cuda()
    for w in (0.1, 0.5, 0.9):
        z = logits.clone().requires_grad_()
        loss = step(z, target, torch.tensor(w, device="cuda"))
        loss.backward()
        ref = ops.cotrain_loss(logits.cpu(), target.cpu(), weight=w, backend="torch")
        torch.testing.assert_close(loss.cpu(), ref.loss, rtol=1e-5, atol=1e-5)


class TinyBranchNet(nn.Module):
    """Conv -> ReLU -> global pool -> linear, S branches batched."""

    def __init__(self, branches, classes=5, width=4):
        super().__init__()
        self.branches, self.width = branches, width
        self.conv = BranchConv2d(3, width, 3, padding=1, branches=branches)
        self.fc = BranchLinear(width, classes, branches=branches)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))  # [N, S*width]
        return self.fc(h.view(x.shape[0], self.branches, self.width))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["js", "kl"])
def test_model_gradients_match_the_reference_backend(backend, kind):
    device = device_for(backend)
    torch.manual_seed(0)
    model = TinyBranchNet(branches=3).to(device)
    x = torch.randn(8, 3, 6, 6, device=device)
    target = torch.randint(0, 5, (8,), device=device)

    def grads(which):
        model.zero_grad()
        ops.cotrain_loss(model(x), target, weight=0.5, kind=kind, temperature=1.5, backend=which).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for got, expected in zip(grads(backend), grads("torch")):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
