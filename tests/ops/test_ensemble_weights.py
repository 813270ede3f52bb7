"""Per-branch weights and the "vote" mode of divco.ops.ensemble on every backend.

Against the float64 reference (values and gradients, hypothesis), hand-computed votes, ties and
NaN rows, weights of 0 next to ±inf / NaN logits, the input errors, opcheck with weights and
torch.compile (fullgraph) with weights.
"""

import math

import pytest
import torch
from backend_params import EXAMPLES, backend_params, device_for, ensemble_modes_for, requires_mode
from hypothesis import given, settings
from hypothesis import strategies as st
from tile_shapes import field

import divco.ops as ops
from divco.ops import reference as R
from divco.ops import schema
from divco.vocabulary import ENSEMBLE_MODES, WEIGHTED_ENSEMBLE_MODES

EPS = {torch.float32: 1.2e-7, torch.bfloat16: 7.8e-3, torch.float16: 9.8e-4}


def weighted_params(modes=WEIGHTED_ENSEMBLE_MODES, names=()):
    return [
        pytest.param(p.values[0], mode, marks=[*p.marks, requires_mode(p.values[0], mode)], id=f"{p.id}-{mode}")
        for p in backend_params(*names)
        for mode in modes
    ]


def vote_params(names=()):
    return [pytest.param(p.values[0], marks=[*p.marks, requires_mode(p.values[0], "vote")], id=p.id)
            for p in backend_params(*names)]


@pytest.mark.parametrize("backend", backend_params())
def test_weighted_ensembles_match_the_reference(backend):
    """Every weighted mode, zeros among the weights, low precision, strided layouts, large K."""
    modes = [m for m in WEIGHTED_ENSEMBLE_MODES if m in ensemble_modes_for(backend)]

    @settings(max_examples=EXAMPLES[backend], deadline=None)
    @given(
        seed=st.integers(0, 2**31 - 1),
        N=field("weighted_ensemble", "N", st.integers(1, 10)),
        K=field("weighted_ensemble", "K", st.one_of(st.integers(2, 64), st.integers(2, 64),
                                                    st.sampled_from([1500, 12000]))),
        raw=field("weighted_ensemble", "raw", st.lists(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, 3.0, 7.25]),
                                                       min_size=1, max_size=7)),
        mode=field("weighted_ensemble", "mode", st.sampled_from(modes)),
        dtype=field("weighted_ensemble", "dtype", st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        as_tensor=field("weighted_ensemble", "as_tensor", st.booleans()),
        transposed=field("weighted_ensemble", "transposed", st.booleans()),
    )
    def check(seed, N, K, raw, mode, dtype, as_tensor, transposed):
        if sum(raw) == 0:
            raw = raw[:-1] + [1.0]
        S = len(raw)
        if K > 64:
            N = min(N, 2)  # the interpreted Triton kernels walk large K slowly
        g = torch.Generator().manual_seed(seed)
        values = (torch.randn(N, S, K, generator=g) * 4).to(dtype)
        device = device_for(backend)
        logits = values.to(device)
        if transposed:  # stored [S, N, K]
            logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
        logits.requires_grad_()
        weights = torch.tensor(raw, device=device) if as_tensor else raw
        grad_out = torch.randn(N, K, generator=g).to(dtype)
        out = ops.ensemble(logits, mode, weights, backend=backend)
        (out.float() * grad_out.to(device).float()).sum().backward()

        z = values.double().requires_grad_()
        ref = R.ensemble(z, mode, torch.tensor(raw, dtype=torch.float64))
        (ref_grad,) = torch.autograd.grad((ref * grad_out.double()).sum(), z)
        ref = ref.detach()
        tol = (2e-5 if dtype == torch.float32 else 4 * EPS[dtype]) + 5e-9 * K
        assert out.dtype == dtype and out.shape == (N, K)
        torch.testing.assert_close(out.detach().cpu().double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
        cancellation = 1e-6 * float(grad_out.abs().max())
        torch.testing.assert_close(logits.grad.cpu().double(), ref_grad, rtol=tol,
                                   atol=tol * float(ref_grad.abs().max()) + cancellation)
        absent = [s for s, w in enumerate(raw) if w == 0]
        assert logits.grad[:, absent].eq(0).all()  # weight 0: no part, no gradient

    check()


@pytest.mark.parametrize("backend, mode", weighted_params())
def test_equal_weights_are_the_unweighted_ensemble(backend, mode):
    device = device_for(backend)
    logits = torch.randn(5, 3, 11).to(device)
    unweighted = ops.ensemble(logits, mode, backend=backend)
    for weights in ([1.0, 1.0, 1.0], torch.full((3,), 0.25, device=device)):
        torch.testing.assert_close(ops.ensemble(logits, mode, weights, backend=backend), unweighted,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", vote_params())
def test_vote_by_hand(backend):
    """S=3, w = [0.5, 0.3, 0.2], top-1s [1, 2, 2]: class 1 gets 0.5, class 2 gets 0.3 + 0.2."""
    device = device_for(backend)
    logits = torch.tensor([[[0.0, 4.0, 1.0, -2.0], [0.0, 1.0, 3.0, 2.0], [-1.0, 0.0, 0.5, 0.25]]], device=device)
    out = ops.ensemble(logits, "vote", [0.5, 0.3, 0.2], backend=backend)
    torch.testing.assert_close(out.cpu(), torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    equal = ops.ensemble(logits, "vote", backend=backend)
    torch.testing.assert_close(equal.cpu(), torch.tensor([[0.0, 1 / 3, 2 / 3, 0.0]]))
    assert out.argmax(-1).item() == 1  # the tie 0.5 : 0.5 goes to the lower class (torch.argmax)
    heavy = ops.ensemble(logits, "vote", torch.tensor([0.6, 0.2, 0.2], device=device), backend=backend)
    assert heavy.argmax(-1).item() == 1 and heavy.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("backend", vote_params())
def test_vote_gradient_is_exactly_zero(backend):
    device = device_for(backend)
    logits = (torch.randn(4, 3, 9) * 3).to(device).requires_grad_()
    for weights in (None, [0.2, 0.0, 0.8]):
        logits.grad = None
        out = ops.ensemble(logits, "vote", weights, backend=backend)
        out.backward(torch.randn(4, 9).to(device))
        assert logits.grad is not None and logits.grad.eq(0).all()


@pytest.mark.parametrize("backend", vote_params())
def test_vote_ties_and_nan_follow_torch_argmax(backend):
    """A member's top-1: the first NaN class if any, else the first maximal class (also when
    the tie spans two tiles of a large K, and for a member entirely -inf: class 0)."""
    nan, inf = math.nan, math.inf
    K = 12000
    logits = torch.zeros(3, 3, K)
    logits[0, 0, [3, 7]] = 5.0  # tie -> 3
    logits[0, 1, [9000, 11999]] = 2.0  # tie across tiles -> 9000
    logits[0, 2, 100] = 1.0
    logits[1, 0, [5, 11000]] = nan  # NaN is the maximum, the first NaN wins -> 5
    logits[1, 0, 4] = 9.0
    logits[1, 1] = -inf  # all -inf -> 0
    logits[1, 2, [10, 20]] = torch.tensor([3.0, inf])  # -> 20
    logits[2, :, 1] = nan  # every member -> 1
    device = device_for(backend)
    out = ops.ensemble(logits.to(device), "vote", [0.5, 0.25, 0.25], backend=backend).cpu()
    top1 = logits.argmax(-1)  # torch's own rule
    assert top1.tolist() == [[3, 9000, 100], [5, 0, 20], [1, 1, 1]]
    expected = R.ensemble(logits.double(), "vote", torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(out.double(), expected)
    assert out[0, 3] == 0.5 and out[0, 9000] == 0.25 and out[1, 5] == 0.5 and out[2, 1] == 1.0
    assert not torch.isnan(out).any()  # a NaN logit is a vote, not a NaN share


@pytest.mark.parametrize("backend, mode", weighted_params())
def test_a_branch_of_weight_zero_takes_no_part(backend, mode):
    """Its ±inf / NaN logits cannot turn 0 · x into NaN, and it gets gradient 0."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(3)
    values = torch.randn(4, 3, 6, generator=g)
    values[:, 1, 0] = math.inf
    values[:, 1, 1] = -math.inf
    values[1, 1] = math.nan
    weights = [0.7, 0.0, 0.3]
    logits = values.to(device).requires_grad_()
    out = ops.ensemble(logits, mode, weights, backend=backend)
    out.backward(torch.ones(4, 6, device=device))
    without = ops.ensemble(values[:, [0, 2]].to(device), mode, [0.7, 0.3], backend=backend)
    torch.testing.assert_close(out.detach(), without, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out).all() and logits.grad[:, 1].eq(0).all() and torch.isfinite(logits.grad).all()
    ref = R.ensemble(values.double(), mode, torch.tensor(weights, dtype=torch.float64))
    torch.testing.assert_close(out.detach().cpu().double(), ref, rtol=1e-5, atol=1e-6)


def test_the_reference_differentiates_the_weights():
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, requires_grad=True)
    for mode in ("mean_logits", "mean_probs", "geo_mean"):
        assert torch.autograd.gradcheck(lambda w: ops.ensemble(logits, mode, w, backend="torch"), (weights,))
    # vote: d out_k / d w_s = ([top1_s = k] - out_k) / Σ w (the normalisation)
    out = ops.ensemble(logits, "vote", weights, backend="torch")
    (grad,) = torch.autograd.grad(out[0, 0], weights)
    top1 = logits[0].argmax(-1)
    torch.testing.assert_close(grad, (top1 == 0).double() - out[0, 0].detach())


@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda"))
def test_fused_backends_refuse_weights_that_require_grad(backend):
    device = device_for(backend)
    logits = torch.randn(2, 3, 4, device=device)
    weights = torch.ones(3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="backend='torch'"):
        ops.ensemble(logits, "mean_probs", weights, backend=backend)
    with torch.no_grad():  # no gradient wanted: fine
        ops.ensemble(logits, "mean_probs", weights, backend=backend)
    ops.ensemble(logits, "mean_probs", weights.detach(), backend=backend)


@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cpu"))
@pytest.mark.parametrize("weights, mode, match", [
    ([1.0, 2.0], "mean_probs", r"one entry per branch, shape \[3\]"),
    (torch.ones(2, 3), "mean_probs", r"shape \[3\]"),
    ([1.0, -1.0, 1.0], "vote", "finite and non-negative"),
    (torch.tensor([1.0, -0.5, 1.0]), "geo_mean", "finite and non-negative"),
    ([1.0, math.inf, 1.0], "mean_logits", "finite"),
    (torch.tensor([1.0, math.nan, 1.0]), "mean_logits", "finite"),
    ([0.0, 0.0, 0.0], "geo_mean", "positive sum"),
    (torch.zeros(3), "vote", "positive sum"),
    ([1.0, 1.0, 1.0], "max", "'max' takes no weights.*mean_logits, mean_probs, geo_mean, vote"),
    (torch.ones(3), "max_probs", "'max_probs' takes no weights"),
    (torch.ones(3, dtype=torch.int64), "mean_probs", "floating-point tensor"),
    ([1.0, True, 1.0], "mean_probs", "numbers"),
    ("abc", "mean_probs", "sequence of 3 numbers"),
    (0.5, "mean_probs", "sequence of 3 numbers"),
])
def test_bad_weights_name_what_was_expected(backend, weights, mode, match):
    logits = torch.randn(2, 3, 4, device=device_for(backend))
    with pytest.raises(ValueError, match=match):
        ops.ensemble(logits, mode, weights, backend=backend)


@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda"))
def test_operators_check_weights_metadata(backend):
    """The operators called directly: float32 [S] on the logits' device, a mode that takes weights."""
    device = device_for(backend)
    forward = schema.operator("ensemble", backend)
    logits = torch.randn(2, 3, 4, device=device)
    for weights, mode, match in [
        (torch.ones(3, device=device, dtype=torch.float64), "mean_probs", "float32"),
        (torch.ones(4, device=device), "mean_probs", r"\[3\]"),
        (torch.ones(3, device=device), "max", "weights"),
    ]:
        with pytest.raises(ValueError, match=match):
            forward(logits, mode, weights)


@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda"))
def test_opcheck_with_weights(backend):
    device = device_for(backend)
    forward = schema.operator("ensemble", backend)
    backward = schema.operator("ensemble_backward", backend)
    logits = torch.randn(2, 3, 6, device=device)
    weights = torch.tensor([0.5, 0.0, 2.0], device=device)
    for mode in WEIGHTED_ENSEMBLE_MODES:
        torch.library.opcheck(forward, (logits.clone().requires_grad_(), mode, weights))
        torch.library.opcheck(backward, (torch.randn(2, 6, device=device), logits, mode, weights))


@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cpu"))
def test_compiles_with_weights_without_graph_breaks(backend):
    """fullgraph=True with a weights tensor; new weight values do not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def combine(logits, weights):
        return ops.ensemble(logits, "geo_mean", weights, backend=backend), ops.ensemble(logits, "vote", weights,
                                                                                        backend=backend)

    device = device_for(backend)
    values = torch.randn(4, 3, 7)
    for raw in ([0.2, 0.3, 0.5], [1.0, 0.0, 2.0]):
        logits = values.clone().to(device).requires_grad_()
        weights = torch.tensor(raw, device=device)
        geo, vote = combine(logits, weights)
        geo.sum().backward()
        ref_z = values.double().requires_grad_()
        ref = R.ensemble(ref_z, "geo_mean", weights.cpu().double())
        ref.sum().backward()
        torch.testing.assert_close(geo.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits.grad.cpu().double(), ref_z.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vote.cpu().double(), R.ensemble(values.double(), "vote", weights.cpu().double()))
    assert counter.frame_count == 1


def test_vote_is_a_probability_mode_in_the_vocabulary():
    from divco.vocabulary import PROBABILITY_MODES

    assert "vote" in ENSEMBLE_MODES and "vote" in WEIGHTED_ENSEMBLE_MODES and "vote" in PROBABILITY_MODES
    assert set(WEIGHTED_ENSEMBLE_MODES) == set(ENSEMBLE_MODES) - {"max", "max_probs"}


@pytest.mark.parametrize("backend,mode", weighted_params(modes=("mean_logits", "mean_probs")))
def test_strided_weights_are_read_with_their_stride(backend, mode):
    """weights[::2] (stride 2): every backend reads w_s, not the s-th element of the storage,
    through the public function and through the operator called directly."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 3, 6, generator=g) * 3).to(device)
    storage = torch.tensor([0.2, 9.0, 0.5, 7.0, 0.3, 5.0], device=device)
    strided = storage[::2]
    assert strided.stride() == (2,)
    expected = R.ensemble(logits.double(), mode, strided.double()).float()
    torch.testing.assert_close(ops.ensemble(logits, mode, weights=strided, backend=backend), expected)
    if backend != "torch":
        direct = schema.operator("ensemble", backend)(logits, mode, strided)
        torch.testing.assert_close(direct, expected)
        grad_out = torch.randn(4, 6, generator=g).to(device)
        backward = getattr(torch.ops.divco, schema.op_name("ensemble_backward", schema_suffix(backend)))
        torch.testing.assert_close(
            backward(grad_out, logits, mode, strided), backward(grad_out, logits, mode, strided.contiguous())
        )


def schema_suffix(backend: str) -> str:
    from divco.vocabulary import OPERATOR_SUFFIX

    return OPERATOR_SUFFIX[backend]
