"""Every backend of cotrain_loss / ensemble against the float64 reference: values and gradients.

Random problems come from hypothesis: S 1-8, K 2-40,000 (few large), N 1-300 (fewer rows for
the interpreted Triton kernels), float32 / bfloat16 / float16, non-contiguous layouts, both
kinds, temperatures other than 1, logits up to ±1e4, hard and soft targets, weight as a
number or a tensor. The reference sees exactly the same (low-precision) values, in float64.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from backend_params import EXAMPLES, MAX_ROWS, backend_params, device_for, ensemble_modes_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tile_shapes import field, pinned

import divco.ops as ops
from divco.ops import reference as R
from divco.ops import schema

EPS = {torch.float32: 1.2e-7, torch.bfloat16: 7.8e-3, torch.float16: 9.8e-4}
MAX_ELEMENTS = 300_000


def make_logits(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same [N, S, K] values in a given memory layout."""
    if layout == "contiguous":
        return values.clone()
    if layout == "branch_major":  # stored [S, N, K]
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "class_major":  # stored [N, K, S]: stride 1 along S
        return values.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "every_other_class":  # a strided view of a wider tensor
        N, S, K = values.shape
        wide = torch.zeros(N, S, 2 * K, dtype=values.dtype, device=values.device)
        wide[..., ::2] = values
        return wide[..., ::2]
    raise AssertionError(layout)


def make_target(kind: str, N: int, K: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, K, (N,), generator=g)
    if kind == "hard":
        return labels
    one_hot = F.one_hot(labels, K).float()
    if kind == "smooth":
        return one_hot * 0.9 + 0.1 / K
    if kind == "mixup":
        lam = torch.rand(N, 1, generator=g)
        return lam * one_hot + (1 - lam) * F.one_hot(torch.randint(0, K, (N,), generator=g), K).float()
    return torch.softmax(torch.randn(N, K, generator=g) * 2, -1)  # "dense"


@st.composite
def problems(draw, max_rows):
    size = draw(st.integers(0, 9))
    if size == 0:
        K = draw(st.sampled_from([8191, 32768, 40000]))
    elif size <= 3:
        K = draw(st.integers(65, 5000))
    else:
        K = draw(st.integers(2, 64))
    S = draw(st.integers(1, 8))
    N = min(draw(st.integers(1, max_rows)), max(1, MAX_ELEMENTS // (S * K)))
    return pinned(draw, "cotrain_loss", dict(  # a fixed tile class on a GPU
        seed=draw(st.integers(0, 2**31 - 1)),
        N=N,
        S=S,
        K=K,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        layout=draw(st.sampled_from(["contiguous", "branch_major", "class_major", "every_other_class"])),
        scale=draw(st.sampled_from([1.0, 4.0, 1e4])),
        target=draw(st.sampled_from(["hard", "smooth", "mixup", "dense"])),
        kind=draw(st.sampled_from(["js", "kl"])),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0, 3.7])),
        weight=draw(st.floats(0.0, 2.0)),
        weight_as_tensor=draw(st.booleans()),
        sample_weight=draw(st.sampled_from([None, None, "with_zeros", "positive"])),
        sample_weight_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
    ))


def make_sample_weight(p, g: torch.Generator) -> torch.Tensor | None:
    """None, or weights in [0, 3) (mean ~1.5, not normalised) with about a quarter exactly 0."""
    if p.get("sample_weight") is None:
        return None
    v = torch.rand(p["N"], generator=g) * 3
    if p["sample_weight"] == "with_zeros":
        v = torch.where(torch.rand(p["N"], generator=g) < 0.25, 0.0, v)
    return v.to(p["sample_weight_dtype"])


def build(p, device):
    g = torch.Generator().manual_seed(p["seed"])
    values = (torch.randn(p["N"], p["S"], p["K"], generator=g) * p["scale"]).to(p["dtype"])
    logits = make_logits(values.to(device), p["layout"]).requires_grad_()
    target = make_target(p["target"], p["N"], p["K"], g).to(device)
    weight = torch.tensor(p["weight"], device=device) if p["weight_as_tensor"] else p["weight"]
    return logits, target, weight


def reference_of(logits, target, weight, kind, temperature, sample_weight=None):
    z = logits.detach().cpu().double().requires_grad_()
    target = target.cpu().double() if target.is_floating_point() else target.cpu()
    weight = weight.item() if isinstance(weight, torch.Tensor) else weight
    # the fused kernels read float32 weights: the reference gets the same values, in float64
    v = None if sample_weight is None else sample_weight.cpu().to(torch.float32).double()
    out = R.cotrain_loss(z, target, weight, kind, temperature, v)
    (grad,) = torch.autograd.grad(out.loss, z)
    return out, grad, z.detach()


def ambiguous_ensemble_rows(z64: torch.Tensor, dtype: torch.dtype) -> int:
    """Rows whose two best mean logits are so close that float32 rounding may swap them."""
    mean = z64.mean(1)
    if mean.shape[-1] < 2:
        return 0
    top2 = mean.topk(2, -1).values
    gap = top2[:, 0] - top2[:, 1]
    return int((gap <= 1e-5 * (1 + top2[:, 0].abs())).sum())


def assert_matches_reference(out, grad, logits, target, weight, kind, temperature, sample_weight=None):
    ref, ref_grad, z64 = reference_of(logits, target, weight, kind, temperature, sample_weight)
    dtype = logits.dtype
    scalars = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss.detach().cpu().double(), ref.loss.detach(), **scalars)
    torch.testing.assert_close(out.ce.cpu().double(), ref.ce, **scalars)
    torch.testing.assert_close(out.cot.cpu().double(), ref.cot, **scalars)
    assert out.loss.dtype == out.ce.dtype == out.cot.dtype == torch.float32
    assert out.ensemble.dtype == dtype and out.correct.dtype == torch.int64

    eps = EPS[dtype]
    ens_ref = z64.mean(1)
    torch.testing.assert_close(
        out.ensemble.cpu().double(), ens_ref, rtol=2 * eps, atol=2 * eps * float(ens_ref.abs().max())
    )
    # Plain PyTorch float32 (the torch backend) sums the K exponentials with an error that grows
    # with K (log_softmax is off by 7e-6 at K = 32768), hence the K term.
    grad_tol = (2e-5 if dtype == torch.float32 else 4 * eps) + 5e-9 * logits.shape[-1]
    # Each gradient entry is (p - y) / N (+ the co-training part) with p, y in [0, 1], computed in
    # float32: when p ≈ y it cancels, and its absolute error stays a few float32 ulps of 1 / N.
    # (Row n is scaled by its sample weight v_n.)
    largest_weight = 1.0 if sample_weight is None else max(1.0, float(sample_weight.float().max()))
    cancellation = 8 * EPS[torch.float32] * largest_weight / logits.shape[0]
    torch.testing.assert_close(
        grad.cpu().double(), ref_grad, rtol=grad_tol, atol=grad_tol * float(ref_grad.abs().max()) + cancellation
    )

    S = logits.shape[1]
    assert out.correct[:S].tolist() == ref.correct[:S].tolist()
    assert abs(int(out.correct[S]) - int(ref.correct[S])) <= ambiguous_ensemble_rows(z64, dtype)


@pytest.mark.parametrize("backend", backend_params())
def test_cotrain_loss_matches_reference(backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(p=problems(MAX_ROWS[backend]))
    def check(p):
        logits, target, weight = build(p, device_for(backend))
        sample_weight = make_sample_weight(p, torch.Generator().manual_seed(p["seed"] + 1))
        if sample_weight is not None:
            sample_weight = sample_weight.to(logits.device)
        out = ops.cotrain_loss(
            logits, target, weight=weight, kind=p["kind"], temperature=p["temperature"],
            sample_weight=sample_weight, backend=backend,
        )
        out.loss.backward()
        assert logits.grad.shape == logits.shape
        assert_matches_reference(
            out, logits.grad, logits, target, weight, p["kind"], p["temperature"], sample_weight
        )

    check()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["js", "kl"])
def test_many_rows_and_large_vocabulary(backend, kind):
    """Fixed corners: N = 300 with few classes, and K = 40,000 (several tiles of classes)."""
    rows = 300 if MAX_ROWS[backend] >= 300 else 16
    for N, S, K in [(rows, 4, 10), (3 if rows == 300 else 1, 2, 40000)]:
        p = dict(seed=N + K, N=N, S=S, K=K, dtype=torch.float32, layout="contiguous", scale=4.0,
                 target="hard", kind=kind, temperature=1.5, weight=0.5, weight_as_tensor=False)
        logits, target, weight = build(p, device_for(backend))
        out = ops.cotrain_loss(logits, target, weight=weight, kind=kind, temperature=1.5, backend=backend)
        out.loss.backward()
        assert_matches_reference(out, logits.grad, logits, target, weight, kind, 1.5)


@pytest.mark.parametrize("backend", backend_params())
def test_ensemble_matches_reference(backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None)
    @given(
        seed=st.integers(0, 2**31 - 1),
        N=field("ensemble", "N", st.integers(1, 12)),
        S=field("ensemble", "S", st.integers(1, 8)),
        K=field("ensemble", "K", st.one_of(st.integers(2, 64), st.integers(2, 64), st.integers(2, 64),
                                           st.sampled_from([1500, 12000]))),
        mode=field("ensemble", "mode", st.sampled_from(ensemble_modes_for(backend))),
        dtype=field("ensemble", "dtype", st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        layout=field("ensemble", "layout", st.sampled_from(["contiguous", "branch_major", "class_major",
                                                             "every_other_class"])),
    )
    def check(seed, N, S, K, mode, dtype, layout):
        if K > 64:
            N = min(N, 2)  # the interpreted Triton kernels walk large K slowly
        g = torch.Generator().manual_seed(seed)
        values = (torch.randn(N, S, K, generator=g) * 4).to(dtype)
        logits = make_logits(values.to(device_for(backend)), layout).requires_grad_()
        grad_out = torch.randn(N, K, generator=g).to(dtype).to(logits.device)
        out = ops.ensemble(logits, mode, backend=backend)
        (out.float() * grad_out.float()).sum().backward()

        z = values.double().requires_grad_()
        ref = R.ensemble(z, mode)
        (ref_grad,) = torch.autograd.grad((ref * grad_out.cpu().double()).sum(), z)
        ref = ref.detach()
        tol = (2e-5 if dtype == torch.float32 else 4 * EPS[dtype]) + 5e-9 * K
        assert out.dtype == dtype and out.shape == (N, K)
        torch.testing.assert_close(out.detach().cpu().double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
        # p (g - <p, g>) cancels when p is nearly one-hot: float32 leaves ~eps·|g| behind
        cancellation = 1e-6 * float(grad_out.abs().max())
        torch.testing.assert_close(
            logits.grad.cpu().double(), ref_grad, rtol=tol, atol=tol * float(ref_grad.abs().max()) + cancellation
        )

    check()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["js", "kl"])
@pytest.mark.parametrize("soft", [False, True])
def test_nan_in_gives_nan_out(backend, kind, soft):
    device = device_for(backend)
    logits = torch.randn(4, 3, 20, device=device)
    logits[2, 1, 5] = math.nan
    logits.requires_grad_()
    target = torch.softmax(torch.randn(4, 20), -1).to(device) if soft else torch.tensor([1, 2, 3, 4], device=device)
    out = ops.cotrain_loss(logits, target, kind=kind, backend=backend)
    out.loss.backward()
    assert torch.isnan(out.loss) and torch.isnan(out.cot) and torch.isnan(out.ce[1])
    assert torch.isnan(logits.grad[2]).any()
    assert torch.isfinite(logits.grad[[0, 1, 3]]).all()  # other samples keep finite gradients
    for mode in ensemble_modes_for(backend):
        out = ops.ensemble(logits.detach(), mode, backend=backend)[2]
        if mode == "vote":  # NaN is the top-1 (torch.argmax): branch 1 votes for class 5
            assert out[5] == 1 / 3 and not torch.isnan(out).any()
        else:
            assert torch.isnan(out).any()


@pytest.mark.parametrize("backend", backend_params())
def test_out_of_range_class_in_the_kernel_gives_nan_loss(backend):
    """What the kernels do when no eager check runs (CUDA, torch.compile): NaN, never a bad read."""
    if backend == "torch":
        pytest.skip("the reference's NaN rows are tested in test_reference.py")
    device = device_for(backend)
    logits = torch.randn(3, 2, 6, device=device)
    target = torch.tensor([1, 600000, -3], device=device)
    weight = torch.tensor(0.5, device=device)
    op = schema.operator("cotrain_loss", backend)
    loss, ce, cot, ensemble, correct, grad = op(logits, target, weight, None, "js", 1.0, True)
    assert torch.isnan(loss) and torch.isnan(ce).all() and torch.isfinite(cot)
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).any()
    assert int(correct.sum()) <= 3  # only the valid row can be right


@pytest.mark.parametrize("backend", backend_params())
def test_correct_counts_follow_torch_argmax_on_ties(backend):
    device = device_for(backend)
    logits = torch.zeros(4, 2, 5, device=device)
    logits[0, 0, 3] = 2.0  # branch 0 says 3, branch 1 ties everywhere -> class 0
    logits[1, :, 4] = 1.0
    logits[2, 1, 2] = 5.0
    target = torch.tensor([3, 4, 0, 0], device=device)
    out = ops.cotrain_loss(logits, target, backend=backend)
    # branch 0: rows 0, 1, 2 (tie -> 0), 3 (tie -> 0); branch 1: rows 1, 3 (tie -> 0);
    # ensemble: rows 0, 1, 3 (tie -> 0)
    assert out.correct.tolist() == [4, 2, 3]
    soft = F.one_hot(target, 5).float() * 0.8 + 0.04
    assert ops.cotrain_loss(logits, soft, backend=backend).correct.tolist() == [4, 2, 3]


@pytest.mark.parametrize("backend", backend_params())
def test_single_branch_and_two_classes(backend):
    device = device_for(backend)
    logits = torch.randn(5, 1, 2, device=device, requires_grad=True)
    target = torch.tensor([0, 1, 1, 0, 1], device=device)
    for kind in ("js", "kl"):
        out = ops.cotrain_loss(logits, target, kind=kind, backend=backend)
        assert out.cot.item() == 0.0
        torch.testing.assert_close(out.loss, F.cross_entropy(logits[:, 0], target))


@pytest.mark.parametrize("backend", backend_params())
def test_no_gradient_work_without_grad(backend):
    device = device_for(backend)
    logits = torch.randn(3, 2, 7, device=device)
    with torch.no_grad():
        out = ops.cotrain_loss(logits.requires_grad_(), torch.tensor([0, 1, 2], device=device), backend=backend)
    assert not out.loss.requires_grad
