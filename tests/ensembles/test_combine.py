"""The weighted ensembles' float64 reference: hand-computed cases, properties, gradients, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import divco
from divco.ensembles.combine import (WEIGHTED_ENSEMBLE_MODES, ensemble_prediction, ensemble_probabilities,
                                     normalized_weights, weighted_ensemble)

F64 = torch.float64


def two_members():
    # member 0: p = [1/2, 1/2]; member 1: p = [3/4, 1/4]; weights 1 : 3
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], dtype=F64)
    return logits, torch.tensor([1.0, 3.0], dtype=F64)


def test_weighted_mean_of_logits():
    logits, w = two_members()
    torch.testing.assert_close(weighted_ensemble(logits, "mean_logits", w),
                               torch.tensor([[0.75 * math.log(3.0), 0.0]], dtype=F64))


def test_weighted_mean_of_probabilities():
    logits, w = two_members()
    torch.testing.assert_close(weighted_ensemble(logits, "mean_probs", w),
                               torch.tensor([[0.25 * 0.5 + 0.75 * 0.75, 0.25 * 0.5 + 0.75 * 0.25]], dtype=F64))


def test_weighted_geometric_mean_is_normalised():
    logits, w = two_members()
    # prod_s p_s^w_s: class 0 ∝ 0.5^0.25 0.75^0.75, class 1 ∝ 0.5^0.25 0.25^0.75 -> ratio 3^0.75
    r = 3.0 ** 0.75
    torch.testing.assert_close(weighted_ensemble(logits, "geo_mean", w), torch.tensor([[r / (1 + r), 1 / (1 + r)]],
                                                                                      dtype=F64))


def test_vote_is_a_weighted_majority_with_ties_to_the_lowest_class():
    # member top-1s: 0, 1, 1 (member 2's logits tie between 1 and 2: its top-1 is 1, the lower index)
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 3.0, 3.0]]], dtype=F64)
    torch.testing.assert_close(weighted_ensemble(logits, "vote"), torch.tensor([[1 / 3, 2 / 3, 0.0]], dtype=F64))
    assert ensemble_prediction(logits, "vote").item() == 1
    assert ensemble_prediction(logits, "vote", [0.6, 0.2, 0.2]).item() == 0
    tie = weighted_ensemble(logits, "vote", [2.0, 1.0, 1.0])  # 0.5 : 0.5 -> class 0
    torch.testing.assert_close(tie, torch.tensor([[0.5, 0.5, 0.0]], dtype=F64))
    assert ensemble_prediction(logits, "vote", [2.0, 1.0, 1.0]).item() == 0


def test_probabilities_of_every_mode_sum_to_one():
    logits = torch.randn(7, 3, 5, dtype=F64)
    for mode in WEIGHTED_ENSEMBLE_MODES:
        probs = ensemble_probabilities(logits, mode, [0.2, 0.5, 0.3])
        torch.testing.assert_close(probs.sum(-1), torch.ones(7, dtype=F64))


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 6), S=st.integers(1, 5), K=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_equal_weights_match_the_unweighted_ensemble_op(N, S, K, seed):
    logits = torch.randn(N, S, K, dtype=F64, generator=torch.Generator().manual_seed(seed))
    for mode in ("mean_logits", "mean_probs", "geo_mean"):
        expected = divco.ops.ensemble(logits, mode, backend="torch")
        torch.testing.assert_close(weighted_ensemble(logits, mode), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weighted_ensemble(logits, mode, torch.full((S,), 7.0)), expected,
                                   rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 6), K=st.integers(2, 6), counts=st.lists(st.integers(0, 3), min_size=2, max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_integer_weights_equal_repeating_members(N, K, counts, seed):
    if sum(counts) == 0:
        return
    S = len(counts)
    logits = torch.randn(N, S, K, dtype=F64, generator=torch.Generator().manual_seed(seed))
    repeated = torch.cat([logits[:, s:s + 1].expand(N, c, K) for s, c in enumerate(counts)], dim=1)
    for mode in WEIGHTED_ENSEMBLE_MODES:
        torch.testing.assert_close(weighted_ensemble(logits, mode, [float(c) for c in counts]),
                                   weighted_ensemble(repeated, mode), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs", "geo_mean"])
def test_gradients_against_finite_differences(mode):
    logits = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, w: weighted_ensemble(z, mode, w), (logits, weights))


def test_normalized_weights():
    torch.testing.assert_close(normalized_weights(None, 4), torch.full((4,), 0.25, dtype=F64))
    torch.testing.assert_close(normalized_weights([1, 3], 2), torch.tensor([0.25, 0.75], dtype=F64))
    torch.testing.assert_close(normalized_weights([0, 2], 2), torch.tensor([0.0, 1.0], dtype=F64))


@pytest.mark.parametrize("logits, mode, weights, match", [
    (torch.randn(2, 3, 4), "median", None, "mode must be one of"),
    (torch.randn(2, 4), "mean_probs", None, r"\[N, S, K\]"),
    (torch.zeros(2, 3, 4, dtype=torch.long), "mean_probs", None, "floating-point"),
    (torch.randn(2, 3, 4), "mean_probs", [1.0, 2.0], r"shape \[3\]"),
    (torch.randn(2, 3, 4), "vote", [1.0, -1.0, 1.0], "non-negative"),
    (torch.randn(2, 3, 4), "geo_mean", [0.0, 0.0, 0.0], "positive sum"),
    (torch.randn(2, 3, 4), "mean_logits", [1.0, math.nan, 1.0], "finite"),
])
def test_bad_input_names_what_was_expected(logits, mode, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_ensemble(logits, mode, weights)
