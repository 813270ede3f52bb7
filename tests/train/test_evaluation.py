"""Test metrics against direct float64 computations: accuracy, NLL, ECE, ensembles, disagreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from divco.train import EvaluationResult, metrics_from_logits
from divco.train.evaluation import expected_calibration_error


def reference_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    confidence, prediction = probs.max(1)
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = (confidence > low) & (confidence <= high) if b else (confidence >= low) & (confidence <= high)
        if members.any():
            acc = (prediction[members] == labels[members]).double().mean()
            conf = confidence[members].mean()
            total += members.double().mean().item() * abs(acc - conf).item()
    return total


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), S=st.integers(1, 4), K=st.integers(2, 7), seed=st.integers(0, 1000))
def test_metrics_match_direct_computation(n, S, K, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, S, K, generator=g) * 3
    labels = torch.randint(0, K, (n,), generator=g)
    result = metrics_from_logits(logits, labels, backend="torch")
    z = logits.double()
    for s in range(S):
        probs = F.softmax(z[:, s], -1)
        assert result.branches[s].acc == pytest.approx((probs.argmax(1) == labels).double().mean().item())
        assert result.branches[s].nll == pytest.approx(F.cross_entropy(z[:, s], labels).item(), rel=1e-5)
        assert result.branches[s].ece == pytest.approx(reference_ece(probs, labels), abs=1e-5)
    ensembles = {
        "mean_logits": F.softmax(z.mean(1), -1),
        "mean_probs": F.softmax(z, -1).mean(1),
        "geo_mean": F.softmax(F.log_softmax(z, -1).mean(1), -1),
        "max": F.softmax(z.max(1).values, -1),
    }
    for mode, probs in ensembles.items():
        scores = result.ensembles[mode]
        assert scores.acc == pytest.approx((probs.argmax(1) == labels).double().mean().item()), mode
        assert scores.nll == pytest.approx(-probs[torch.arange(n), labels].log().mean().item(), rel=1e-5), mode
        assert scores.ece == pytest.approx(reference_ece(probs, labels), abs=1e-5), mode
    predictions = z.argmax(-1)
    if S == 1:
        assert result.disagreement is None and result.mean_disagreement is None
    else:
        for s in range(S):
            for t in range(S):
                expected = (predictions[:, s] != predictions[:, t]).double().mean().item()
                assert result.disagreement[s][t] == pytest.approx(expected)
    assert EvaluationResult.from_dict(result.to_dict()) == result


def test_ece_of_known_cases():
    labels = torch.tensor([0, 1, 0, 1])
    certain_right = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert expected_calibration_error(certain_right, labels).item() == 0.0
    certain_wrong = certain_right.flip(1)
    assert expected_calibration_error(certain_wrong, labels).item() == pytest.approx(1.0)
    # confidence 0.7 everywhere, 50 % right: ECE 0.2
    p = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.3, 0.7], [0.3, 0.7]], dtype=torch.float64)
    assert expected_calibration_error(p, torch.tensor([0, 1, 1, 0])).item() == pytest.approx(0.2)


def test_table_and_bad_shapes():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [2.5, 0.0]]])
    result = metrics_from_logits(logits, torch.tensor([0, 0]), backend="torch")
    assert result.branches[0].acc == 1.0 and result.branches[1].acc == 0.5
    assert result.mean_disagreement == 0.5
    table = result.table("title")
    assert table.splitlines()[0] == "title" and "ensemble geo_mean" in table and "50.00 % mean over 1 pair" in table
    with pytest.raises(ValueError, match=r"expected logits \[N, S, K\]"):
        metrics_from_logits(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
