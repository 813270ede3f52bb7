"""Edge values give the same answer on every backend.

-inf logits (masked classes) have probability 0 and add nothing; logits near ±3e38 give the
reference's finite values; NaN counts as the maximum of the max ensembles and routes their
gradient to the first NaN branch; double backward through a fused backend is an error, never
a silent zero. Native builds older than these semantics are skipped with the reason.
"""

import math

import pytest
import torch
from backend_params import backend_params, device_for, ensemble_modes_for, requires_edge_semantics, requires_mode

import divco.ops as ops
from divco.ops import reference as R


def edge_params(*names):
    return [
        pytest.param(*p.values, marks=[*p.marks, requires_edge_semantics(p.values[0])], id=p.id)
        for p in backend_params(*names)
    ]


def loss_and_grad(logits, target, backend, **kwargs):
    z = logits.detach().clone().to(device_for(backend)).requires_grad_()
    out = ops.cotrain_loss(z, target.to(z.device), backend=backend, **kwargs)
    out.loss.backward()
    return out, z.grad.cpu()


def reference_loss_and_grad(logits, target, **kwargs):
    z = logits.detach().double().requires_grad_()
    out = R.cotrain_loss(z, target, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, z)
    return out, grad


@pytest.mark.parametrize("backend", edge_params())
@pytest.mark.parametrize("kind", ["js", "kl"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_masked_classes_have_probability_zero(backend, kind, soft):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, 12, generator=g)
    logits[:, :, 9:] = -math.inf  # classes 9-11 masked in every branch
    logits[1, 0, 4] = -math.inf  # and one class in one branch of one sample
    labels = torch.randint(0, 9, (5,), generator=g)
    labels[1] = 5  # the target never sits on a masked class (its cross-entropy would be inf)
    if soft:
        target = torch.softmax(torch.randn(5, 12, generator=g), -1) * (torch.arange(12) < 9)
        target[1, 4] = 0.0
        target = target / target.sum(-1, keepdim=True)
    else:
        target = labels
    out, grad = loss_and_grad(logits, target, backend, weight=0.7, kind=kind, temperature=1.5)
    ref, ref_grad = reference_loss_and_grad(logits, target, weight=0.7, kind=kind, temperature=1.5)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert grad[:, :, 9:].eq(0).all() and grad[1, 0, 4] == 0
    for mode in ensemble_modes_for(backend):
        got = ops.ensemble(logits.to(device_for(backend)), mode, backend=backend).cpu().double()
        torch.testing.assert_close(got, R.ensemble(logits.double(), mode), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", edge_params())
def test_a_branch_entirely_masked_is_nan(backend):
    logits = torch.randn(2, 2, 6)
    logits[0, 1] = -math.inf
    out = ops.cotrain_loss(logits.to(device_for(backend)), torch.tensor([1, 2], device=device_for(backend)),
                           backend=backend)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", edge_params("torch", "triton", "cpu", "cuda"))
def test_a_whole_tile_of_minus_inf_in_one_branch(backend):
    """K spans many tiles and branch 1's first 8,192 classes are -inf: the online softmax must
    not compute -inf - -inf."""
    K = 40_000
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, K, generator=g)
    logits[0, 1, :8192] = -math.inf
    target = torch.tensor([9000])
    out, grad = loss_and_grad(logits, target, backend, kind="js")
    ref, ref_grad = reference_loss_and_grad(logits, target, kind="js")
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-8)
    for mode in ("mean_probs", "geo_mean"):
        got = ops.ensemble(logits.to(device_for(backend)), mode, backend=backend).cpu().double()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, R.ensemble(logits.double(), mode), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("backend", edge_params())
@pytest.mark.parametrize("kind", ["js", "kl"])
def test_huge_logits_give_the_same_answer_everywhere(backend, kind):
    logits = torch.tensor([[[3e38, -3e38, 0.0, 1.0], [3e38, 2.0, -3e38, 0.5]],
                           [[1.0, 2.0, 3.0, 4.0], [-3e38, 2.5e38, 0.0, 0.0]]])
    target = torch.tensor([0, 1])
    out, grad = loss_and_grad(logits, target, backend, kind=kind)
    ref = R.cotrain_loss(logits, target, kind=kind)  # the float32 reference: the same rounding
    assert torch.isfinite(out.loss) and torch.isfinite(out.cot)
    torch.testing.assert_close(out.loss.cpu(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ensemble.cpu(), ref.ensemble)
    assert out.ensemble[0, 0] == 3e38  # the mean fits although the sum does not
    assert torch.isfinite(grad).all()
    for mode in ensemble_modes_for(backend):
        got = ops.ensemble(logits.to(device_for(backend)), mode, backend=backend).cpu()
        torch.testing.assert_close(got, R.ensemble(logits, mode), rtol=1e-5, atol=1e-6)


def max_mode_params():
    return [
        pytest.param(*p.values, mode, marks=[*p.marks, requires_edge_semantics(p.values[0]),
                                             requires_mode(p.values[0], mode)], id=f"{p.id}-{mode}")
        for p in backend_params()
        for mode in ("max", "max_probs")
    ]


@pytest.mark.parametrize("backend, mode", max_mode_params())
def test_max_ensembles_route_nan_and_ties_like_torch_max(backend, mode):
    nan = math.nan
    logits = torch.tensor([[[1.0, 5.0, 0.0, 2.0], [nan, 5.0, 0.0, 3.0], [nan, 1.0, 0.0, 3.0]],
                           [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]])
    grad_out = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.25, 1.0, -1.0, 2.0]])
    z = logits.clone().to(device_for(backend)).requires_grad_()
    out = ops.ensemble(z, mode, backend=backend)
    out.backward(grad_out.to(z.device))
    ref_z = logits.double().requires_grad_()
    ref = R.ensemble(ref_z, mode)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), equal_nan=True)
    torch.testing.assert_close(z.grad.cpu().double(), ref_z.grad, equal_nan=True)


@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda"))
def test_double_backward_is_an_error_not_a_silent_zero(backend):
    device = device_for(backend)
    logits = torch.randn(4, 2, 5, device=device, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3], device=device)
    loss = ops.cotrain_loss(logits, target, backend=backend).loss
    with pytest.raises(RuntimeError, match=rf"backend='{backend}'.*higher-order gradients.*backend='torch'"):
        torch.autograd.grad(loss, logits, create_graph=True)
    out = ops.ensemble(logits, "mean_probs", backend=backend)
    with pytest.raises(RuntimeError, match=rf"divco.ops.ensemble with backend='{backend}'"):
        torch.autograd.grad(out.sum(), logits, create_graph=True)
    # a first-order backward still works after the refusal
    (grad,) = torch.autograd.grad(ops.cotrain_loss(logits, target, backend=backend).loss, logits)
    assert torch.isfinite(grad).all()


def test_double_backward_through_the_torch_backend():
    logits = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    loss = ops.cotrain_loss(logits, target, backend="torch").loss
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    (penalty,) = torch.autograd.grad(grad.square().sum(), logits)
    assert penalty.abs().sum() > 0


@pytest.mark.parametrize("backend", backend_params("triton", "cpu"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_sized_gradients_do_not_overflow_or_flush(backend, dtype):
    """A GradScaler multiplies the loss by 65536: the fused backward must scale in float32 and
    cast last. At N = 256 an fp16-stored gradient loses its small entries."""
    N, S, K = 256, 4, 1000 if backend != "triton" else 200
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(N, S, K, generator=g) * 3).to(dtype)
    target = torch.randint(0, K, (N,), generator=g)
    scale = 65536.0
    z = values.clone().to(device_for(backend)).requires_grad_()
    (ops.cotrain_loss(z, target.to(z.device), backend=backend).loss * scale).backward()
    ref_z = values.double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(R.cotrain_loss(ref_z, target).loss * scale, ref_z)
    got = z.grad.cpu().double()
    assert torch.isfinite(got).all()
    expected = ref_grad.to(dtype).double()  # the best a gradient in this dtype can be
    if backend == "triton" or dtype == torch.bfloat16:
        # entries below float16's smallest subnormal survive only if the kernel stored float32
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-3)
    else:
        assert got.abs().max() <= 1.1 * ref_grad.abs().max()  # finite and of the right size


@pytest.mark.parametrize("backend", edge_params())
def test_top1_counts_treat_nan_as_the_maximum(backend):
    """tl.max ignores NaN on GPUs and propagates it in the interpreter: the kernels take their
    max over NaN-free values and handle NaN explicitly, as torch.argmax does."""
    nan = math.nan
    logits = torch.tensor([[[0.0, nan, 5.0, 1.0], [2.0, 1.0, 0.0, 0.0]],
                           [[3.0, 1.0, 0.0, nan], [nan, 9.0, 0.0, 0.0]],
                           [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    target = torch.tensor([1, 3, 1])
    out = ops.cotrain_loss(logits.to(device_for(backend)), target.to(device_for(backend)), backend=backend)
    assert out.correct.tolist() == R.correct_counts(logits.double(), target).tolist()
