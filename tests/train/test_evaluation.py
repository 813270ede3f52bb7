"""Test metrics against direct float64 computations: accuracy, NLL, ECE, ensembles, disagreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import math

from divco import calibration, ops
from divco.train import EvaluationResult, metrics_from_logits
from divco.train.evaluation import ENSEMBLE_MODES, expected_calibration_error, temperature_scaling, temperature_table


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


def distinct_confidences(probs: torch.Tensor) -> bool:
    """Whether the float64 confidences are far enough apart to keep their order in float32.

    AURC is a rank statistic: two confidences 2e-11 apart in float64 tie in the float32
    evaluation, and the order of a tie moves AURC by ~1/n (hypothesis found n=46, S=4, K=2,
    seed=304). The ranking itself is tested in tests/test_calibration.py.
    """
    confidence = probs.max(1).values.sort().values
    return bool((confidence.diff() > 1e-6).all())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), S=st.integers(1, 4), K=st.integers(2, 7), seed=st.integers(0, 1000))
@example(n=46, S=4, K=2, seed=304)  # confidences that tie in float32 only
def test_metrics_match_direct_computation(n, S, K, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, S, K, generator=g) * 3
    labels = torch.randint(0, K, (n,), generator=g)
    result = metrics_from_logits(logits, labels, backend="torch")
    z = logits.double()
    for s in range(S):
        probs = F.softmax(z[:, s], -1)
        assert result.branches[s].acc == pytest.approx((probs.argmax(1) == labels).double().mean().item())
        # abs: a float32 softmax near 1 carries ~6e-8 absolute error, far above rel=1e-5 of a tiny NLL
        assert result.branches[s].nll == pytest.approx(F.cross_entropy(z[:, s], labels).item(), rel=1e-5, abs=1e-6)
        assert result.branches[s].ece == pytest.approx(reference_ece(probs, labels), abs=1e-5)
        assert result.branches[s].brier == pytest.approx(calibration.brier_score(probs, labels).item(), abs=1e-6)
        assert result.branches[s].adaptive_ece == pytest.approx(
            calibration.adaptive_calibration_error(probs, labels).item(), abs=1e-6)
        if distinct_confidences(probs):
            assert result.branches[s].aurc == pytest.approx(calibration.aurc(probs, labels).item(), abs=1e-6)
    ensembles = {
        "mean_logits": F.softmax(z.mean(1), -1),
        "mean_probs": F.softmax(z, -1).mean(1),
        "geo_mean": F.softmax(F.log_softmax(z, -1).mean(1), -1),
        "max": F.softmax(z.max(1).values, -1),
        "max_probs": F.softmax(z, -1).max(1).values,  # the official max ensemble (not renormalised)
        "vote": F.one_hot(z.argmax(-1), K).to(z.dtype).mean(1),  # the shares of the vote, a distribution
    }
    assert set(result.ensembles) == set(ensembles) == set(ENSEMBLE_MODES)
    for mode, probs in ensembles.items():
        scores = result.ensembles[mode]
        assert scores.acc == pytest.approx((probs.argmax(1) == labels).double().mean().item()), mode
        # a share of 0 (no vote for the true class) is clamped at the smallest float64: NLL ≈ 708, not inf
        true = probs[torch.arange(n), labels].double().clamp_min(torch.finfo(torch.float64).tiny)
        assert scores.nll == pytest.approx(-true.log().mean().item(), rel=1e-5, abs=1e-6), mode
        assert scores.ece == pytest.approx(reference_ece(probs, labels), abs=1e-5), mode
        assert scores.brier == pytest.approx(calibration.brier_score(probs, labels).item(), abs=1e-6), mode
        if distinct_confidences(probs):
            assert scores.aurc == pytest.approx(calibration.aurc(probs, labels).item(), abs=1e-6), mode
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


def test_ece_puts_a_confidence_on_a_bin_edge_in_the_lower_bin():
    """The ECE is divco.calibration's ((m-1)/M, m/M] (Guo et al.); the former floor(c * M) binning put
    c = 0.6 = 9/15 in [0.6, 0.667) with 0.65 and reported |0.5 - 0.625| = 0.125 here."""
    probs = torch.tensor([[0.6, 0.4], [0.65, 0.35]], dtype=torch.float64)
    labels = torch.tensor([0, 1])  # 0.6 right, 0.65 wrong: bins of their own give (0.4 + 0.65) / 2
    assert expected_calibration_error(probs, labels).item() == pytest.approx(0.525)
    assert expected_calibration_error(probs, labels).item() == pytest.approx(reference_ece(probs, labels))


def test_calibration_metrics_of_a_hand_computed_case():
    # two images, one branch: p = (0.8, 0.2) right, p = (0.6, 0.4) wrong
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]], dtype=torch.float64)
    result = metrics_from_logits(probs.log()[:, None].float(), torch.tensor([0, 1]), backend="torch")
    scores = result.branches[0]
    assert scores.brier == pytest.approx(((0.2 ** 2 + 0.2 ** 2) + (0.6 ** 2 + 0.6 ** 2)) / 2, abs=1e-6)
    assert scores.aurc == pytest.approx((0 / 1 + 1 / 2) / 2, abs=1e-6)  # the confident one is right
    assert scores.adaptive_ece == pytest.approx((abs(0.6 - 0) + abs(0.8 - 1)) / 2, abs=1e-6)
    record = result.to_dict()
    assert record["test_brier"] == pytest.approx(scores.brier) and record["test_branch_aurc"] == [scores.aurc]


def test_nan_logits_give_nan_metrics_not_an_error():
    logits = torch.tensor([[[float("nan"), 0.0]], [[1.0, 0.0]]])
    scores = metrics_from_logits(logits, torch.tensor([0, 0]), backend="torch").branches[0]
    assert all(math.isnan(v) for v in (scores.ece, scores.brier, scores.adaptive_ece, scores.aurc))


def test_records_written_before_the_calibration_metrics_still_read():
    record = metrics_from_logits(torch.randn(5, 2, 3), torch.tensor([0, 1, 2, 0, 1]), backend="torch").to_dict()
    for name in ("brier", "adaptive_ece", "aurc"):
        del record[f"test_branch_{name}"], record[f"test_{name}"]
        for scores in record["test_ensembles"].values():
            del scores[name]
    old = EvaluationResult.from_dict(record)
    assert math.isnan(old.branches[1].aurc) and math.isnan(old.ensembles["geo_mean"].brier)
    assert old.branches[1].acc == record["test_branch_acc"][1]


def test_temperature_scaling_fits_on_one_half_and_reports_on_the_other():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (40,), generator=g)
    logits = 4 * torch.randn(40, 2, 4, generator=g) + 3 * F.one_hot(labels, 4)[:, None]  # overconfident
    report = temperature_scaling(logits, labels)
    assert (report["fit_images"], report["eval_images"], report["seed"]) == (20, 20, 0)
    for s in range(2):
        assert report["branches"][s] == calibration.temperature_scaled(logits[:, s].double(), labels)
    assert set(report["ensembles"]) == set(ENSEMBLE_MODES)
    mean = report["ensembles"]["mean_logits"]
    assert mean == calibration.temperature_scaled(ops.ensemble(logits, "mean_logits", backend="torch").double(), labels)
    geo = report["ensembles"]["geo_mean"]  # a probability mode is scaled through its log-probabilities
    log_p = ops.ensemble(logits, "geo_mean", backend="torch").double().log()
    assert geo["temperature"] == pytest.approx(calibration.temperature_scaled(log_p, labels)["temperature"])
    assert mean["temperature"] > 1 and mean["scaled"]["nll"] < mean["unscaled"]["nll"]
    title = "temperature scaling: T fitted on 20 test images, metrics on the other 20 (seed 0)"
    assert title in temperature_table(report)


def test_temperature_scaling_says_why_it_cannot_fit():
    one = temperature_scaling(torch.randn(1, 2, 3), torch.tensor([1]))
    assert one["fit_images"] == 0 and one["branches"][0]["temperature"] is None
    assert "num_samples must be an int >= 2" in one["branches"][0]["error"]
    diverged = temperature_scaling(torch.full((4, 1, 3), float("nan")), torch.tensor([0, 1, 2, 0]))
    assert diverged["ensembles"]["mean_logits"]["error"] == "logits must be finite to fit a temperature"
    assert "not fitted: logits must be finite" in temperature_table(diverged)
