"""Ensemble weights fitted on held-out data: the maximum of the mixture log-likelihood."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from divco.ensembles.heldout import heldout_weights, mean_log_likelihood, true_class_probabilities


def grid_maximum(q: torch.Tensor, steps: int = 40) -> float:
    """The best L(w) over a grid of the 3-member simplex (a readable reference)."""
    best = -float("inf")
    for a, b in itertools.product(range(steps + 1), repeat=2):
        if a + b <= steps:
            best = max(best, mean_log_likelihood(q, [a / steps, b / steps, (steps - a - b) / steps]))
    return best


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_heldout_weights_reach_the_maximum_likelihood(seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.rand(30, 3, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    weights = heldout_weights(q)
    assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0)
    assert mean_log_likelihood(q, weights) >= grid_maximum(q) - 1e-9
    for j in range(3):  # never below the best single member (a vertex of the simplex)
        assert mean_log_likelihood(q, weights) >= mean_log_likelihood(q, [float(i == j) for i in range(3)]) - 1e-12


def test_heldout_weights_drop_a_member_that_adds_nothing():
    strong = torch.full((50,), 0.9, dtype=torch.float64)
    weak = torch.full((50,), 0.1, dtype=torch.float64)  # worse on every image
    weights = heldout_weights(torch.stack([weak, strong], 1))
    assert weights[0] < 1e-3 and weights[1] > 0.999


def test_heldout_weights_are_deterministic_and_one_member_weighs_one():
    q = torch.rand(20, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert heldout_weights(q) == heldout_weights(q.clone())
    assert heldout_weights(q[:, :1]) == [1.0]


def test_true_class_probabilities_are_the_softmax_of_the_label():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = true_class_probabilities(logits, torch.tensor([0, 2]))
    assert torch.allclose(p, torch.stack([torch.softmax(logits[0].double(), 0)[0], torch.tensor(1 / 3).double()]))


@pytest.mark.parametrize("q, message", [
    (torch.ones(3), r"expected true-class probabilities \[N, M\]"),
    (torch.full((3, 2), 2.0), r"at most 1"),
    (torch.full((3, 2), float("nan")), r"finite"),
])
def test_bad_probabilities_are_refused(q, message):
    with pytest.raises(ValueError, match=message):
        heldout_weights(q)
