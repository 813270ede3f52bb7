"""The float64 reference (divco.ops.reference) against independent formulas.

Everything else is tested against this reference, so it is checked here against closed
forms derived by hand (gradients of "js" and "kl"), against PyTorch's own losses, and
against the definitions it rewrites (KL identity of JS, the geometric-mean shortcut).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from divco.ops import reference as R
from divco.vocabulary import ENSEMBLE_MODES


def random_problem(seed, N, S, K, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, S, K, generator=g, dtype=torch.float64) * scale).requires_grad_()
    labels = torch.randint(0, K, (N,), generator=g)
    return logits, labels


shapes = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 9), st.integers(1, 6), st.integers(2, 12))


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from([0.5, 1.0, 2.5]), st.floats(0.0, 2.0))
def test_js_gradient_matches_closed_form(shape, temperature, weight):
    seed, N, S, K = shape
    z, y = random_problem(seed, N, S, K)
    out = R.cotrain_loss(z, y, weight, "js", temperature)
    (grad,) = torch.autograd.grad(out.loss, z)

    z = z.detach()
    p = torch.softmax(z / temperature, -1)
    p_bar = p.mean(1, keepdim=True)
    kl = (p * (p.log() - p_bar.log())).sum(-1, keepdim=True)
    d_cot = (1 / S) * p * ((p.log() - p_bar.log()) - kl) / temperature
    d_ce = torch.softmax(z, -1) - F.one_hot(y, K)[:, None].double()
    expected = (d_ce + weight * d_cot) / N
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from([0.5, 1.0, 2.5]), st.floats(0.0, 2.0))
def test_kl_gradient_matches_closed_form(shape, temperature, weight):
    seed, N, S, K = shape
    z, y = random_problem(seed, N, S, K)
    out = R.cotrain_loss(z, y, weight, "kl", temperature)
    (grad,) = torch.autograd.grad(out.loss, z)

    z = z.detach()
    p = torch.softmax(z / temperature, -1)
    d_cot = (S * (p - p.mean(1, keepdim=True)) / (S - 1) if S > 1 else 0 * p) / temperature
    d_ce = torch.softmax(z, -1) - F.one_hot(y, K)[:, None].double()
    expected = (d_ce + weight * d_cot) / N
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from([0.5, 1.0, 2.5]))
def test_js_is_mean_kl_to_the_mixture(shape, temperature):
    seed, N, S, K = shape
    z, _ = random_problem(seed, N, S, K)
    p = torch.softmax(z.detach() / temperature, -1)
    p_bar = p.mean(1, keepdim=True)
    expected = (p * (p.log() - p_bar.log())).sum(-1).mean(1).mean()
    torch.testing.assert_close(R.js_divergence(z, temperature), expected)


def test_pairwise_kl_value_matches_double_sum():
    z, _ = random_problem(1, 5, 4, 7)
    p = torch.softmax(z.detach() / 2.0, -1)
    total = 0
    for s in range(4):
        for t in range(4):
            if s != t:
                total = total + (p[:, t] * (p[:, t].log() - p[:, s].log())).sum(-1)
    torch.testing.assert_close(R.pairwise_kl(z, 2.0), (total / 3).mean())


def test_cross_entropy_matches_torch_hard_and_one_hot_soft():
    z, y = random_problem(2, 8, 3, 6)
    expected = torch.stack([F.cross_entropy(z[:, s], y) for s in range(3)])
    torch.testing.assert_close(R.cross_entropy_per_branch(z, y), expected)
    soft = F.one_hot(y, 6).double()
    torch.testing.assert_close(R.cross_entropy_per_branch(z, soft), expected)
    smooth = soft * 0.9 + 0.1 / 6
    expected_smooth = torch.stack([F.cross_entropy(z[:, s], smooth) for s in range(3)])
    torch.testing.assert_close(R.cross_entropy_per_branch(z, smooth), expected_smooth)


def test_single_branch_has_no_cotraining_term():
    z, y = random_problem(3, 4, 1, 5)
    for kind in ("js", "kl"):
        out = R.cotrain_loss(z, y, 0.5, kind)
        assert out.cot.item() == 0.0
        torch.testing.assert_close(out.loss, F.cross_entropy(z[:, 0], y))


def test_extreme_logits_stay_finite():
    z, y = random_problem(4, 6, 4, 50, scale=1e4)
    for kind in ("js", "kl"):
        out = R.cotrain_loss(z, y, 0.5, kind, 0.7)
        (grad,) = torch.autograd.grad(out.loss, z)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_out_of_range_class_gives_nan_for_that_sample_only():
    z, y = random_problem(5, 4, 2, 5)
    y[1] = 7
    ce = R.cross_entropy_per_branch(z, y)
    assert torch.isnan(ce).all()
    assert torch.isfinite(R.cross_entropy_per_branch(z[[0, 2, 3]], y[[0, 2, 3]])).all()


def test_correct_counts_and_ties():
    z = torch.zeros(3, 2, 4, dtype=torch.float64)
    z[0, 0, 2] = 1.0  # branch 0 predicts 2, branch 1 ties everywhere -> index 0
    z[1, :, 1] = 1.0
    y = torch.tensor([2, 1, 0])
    # branch 0: samples 0, 1 and 2 (tie -> 0) right; branch 1: 1 and 2; ensemble: 0, 1, 2
    assert R.correct_counts(z, y).tolist() == [3, 2, 3]
    soft = F.one_hot(y, 4).double()
    assert R.correct_counts(z, soft).tolist() == [3, 2, 3]


@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_ensemble_definitions(mode):
    z, _ = random_problem(6, 5, 3, 7)
    z = z.detach()
    expected = {
        "mean_logits": z.mean(1),
        "mean_probs": torch.softmax(z, -1).mean(1),
        # normalised geometric mean of the probabilities
        "geo_mean": torch.softmax(z, -1).log().mean(1).exp() / torch.softmax(z, -1).log().mean(1).exp().sum(-1, True),
        "max": z.amax(1),
        # the official code: torch.max(F.softmax(torch.stack(outputs), -1), 0), not renormalised
        "max_probs": torch.softmax(z, -1).amax(1),
        # each branch's top-1 class gets 1/S
        "vote": F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype).mean(1),
    }[mode]
    torch.testing.assert_close(R.ensemble(z, mode), expected)


def test_max_ensemble_gradient_goes_to_first_maximal_branch():
    z = torch.tensor([[[1.0, 5.0], [1.0, 2.0], [0.0, 5.0]]], requires_grad=True)
    R.ensemble(z, "max").sum().backward()
    assert z.grad.tolist() == [[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]]


def test_max_probs_gradient_goes_through_the_first_maximal_branchs_softmax():
    z = torch.tensor([[[1.0, 5.0, 0.0], [1.0, 5.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    (R.ensemble(z, "max_probs") * g).sum().backward()
    p = torch.softmax(z.detach(), -1)
    # column 1: branch 0 (the first of two equal maxima, 0.97); columns 0 and 2: branch 2 (1/3)
    routed = torch.zeros_like(p)
    routed[0, 0, 1], routed[0, 2, 0], routed[0, 2, 2] = g[0, 1], g[0, 0], g[0, 2]
    expected = p * routed - p * (p * routed).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, expected)


@pytest.mark.parametrize("mode", ["max", "max_probs"])
def test_max_ensembles_route_nan_to_the_first_nan_branch(mode):
    z = torch.tensor([[[1.0, 5.0], [math.nan, 2.0], [math.nan, 9.0]]], dtype=torch.float64, requires_grad=True)
    out = R.ensemble(z, mode)
    assert math.isnan(out[0, 0]) and (mode == "max_probs" or out[0, 1] == 9.0)
    (grad,) = torch.autograd.grad(out, z, torch.ones_like(out))
    routed = grad.ne(0)
    assert routed[0, 1].all() if mode == "max_probs" else routed[0, :, 0].tolist() == [False, True, False]


def test_inf_logits_have_probability_zero_and_add_nothing():
    """-inf (a masked class) in every branch: the same loss and gradient as without the class."""
    z, y = random_problem(11, 5, 3, 6)
    masked = torch.cat([z.detach(), torch.full((5, 3, 2), -math.inf, dtype=torch.float64)], -1).requires_grad_()
    for kind in ("js", "kl"):
        for target in (y, F.one_hot(y, 8).double() * 0.9 + 0.1 * F.one_hot((y + 1) % 6, 8).double()):
            cut = target if target.dim() == 1 else target[:, :6]
            ref = R.cotrain_loss(z, cut, 0.7, kind, 1.5)
            out = R.cotrain_loss(masked, target, 0.7, kind, 1.5)
            (g_ref,) = torch.autograd.grad(ref.loss, z)
            (g,) = torch.autograd.grad(out.loss, masked)
            torch.testing.assert_close(out.loss, ref.loss)
            torch.testing.assert_close(g[..., :6], g_ref)
            assert g[..., 6:].eq(0).all()
    # masked in one branch only: both terms stay finite, and the masked logit gets no gradient
    one = z.detach().clone()
    one[:, 0, 0] = -math.inf
    one.requires_grad_()
    for kind in ("js", "kl"):
        out = R.cotrain_loss(one, y % 5 + 1, 0.5, kind)  # no target on the masked class 0
        (g,) = torch.autograd.grad(out.loss, one)
        assert torch.isfinite(out.loss) and torch.isfinite(g).all() and g[:, 0, 0].eq(0).all()
    # a branch entirely -inf is undefined
    dead = z.detach().clone()
    dead[0, 1] = -math.inf
    assert torch.isnan(R.cotrain_loss(dead, y, 0.5, "js").loss)


def test_huge_logits_give_finite_terms_and_an_ensemble_that_fits():
    z = torch.tensor([[[3e38, -3e38, 0.0], [3e38, 1.0, -3e38]]], dtype=torch.float32)
    y = torch.tensor([0])
    out = R.cotrain_loss(z, y, 0.5, "js")
    assert torch.isfinite(out.cot) and torch.isfinite(out.loss)
    assert R.ensemble(z, "mean_logits")[0, 0] == 3e38
    assert torch.isfinite(out.ensemble).all()


def test_low_precision_logits_accumulate_in_float32():
    z, y = random_problem(7, 6, 2, 9)
    out = R.cotrain_loss(z.detach().to(torch.bfloat16), y)
    assert out.loss.dtype == torch.float32 and out.ensemble.dtype == torch.bfloat16
    exact = R.cotrain_loss(z.detach().to(torch.bfloat16).double(), y)
    assert math.isclose(out.loss.item(), exact.loss.item(), rel_tol=1e-5)
