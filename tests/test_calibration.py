"""Calibration and uncertainty metrics: hand-computed cases, TorchUncertainty / torchmetrics, NaN safety."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from divco.calibration import (TEMPERATURE_BOUNDS, adaptive_calibration_error, aurc, brier_score, calibration_metrics,
                               expected_calibration_error, fit_temperature, held_out_split, risk_coverage_curve,
                               scaled_on, temperature_scaled)

F64 = torch.float64

# Four predictions: A hit at 0.8, B miss at 0.6, C hit at 0.7, D miss at 0.9.
PROBS = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]], dtype=F64)
LABELS = torch.tensor([0, 1, 1, 1])


def test_brier_score_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=F64)
    assert brier_score(probs, torch.tensor([0, 0])).item() == pytest.approx((0.18 + 0.72) / 2)


def test_ece_by_hand():
    # 2 bins: all four in (0.5, 1]: |acc 0.5 - conf 0.75| = 0.25. 10 bins: each alone: (0.2+0.6+0.3+0.9)/4.
    assert expected_calibration_error(PROBS, LABELS, bins=2).item() == pytest.approx(0.25)
    assert expected_calibration_error(PROBS, LABELS, bins=10).item() == pytest.approx(0.5)


def test_ece_bins_are_closed_on_the_right():
    # confidence exactly 0.5 belongs to the bin (0, 0.5]: (|1 - 0.5| + |0 - 0.9|) / 2, not |0.5 - 0.7|
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=F64)
    assert expected_calibration_error(probs, torch.tensor([0, 1]), bins=2).item() == pytest.approx(0.7)
    certain = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)  # confidence 1 lands in the last bin
    assert expected_calibration_error(certain, torch.tensor([0, 0]), bins=15).item() == pytest.approx(0.5)


def test_adaptive_ece_by_hand():
    # sorted: 0.6 miss, 0.7 hit | 0.8 hit, 0.9 miss -> (|0.6 + 0.7 - 1| + |0.8 + 0.9 - 1|) / 4
    assert adaptive_calibration_error(PROBS, LABELS, bins=2).item() == pytest.approx(0.25)
    # more bins than samples: one sample per bin, as equal-width bins holding one each
    assert adaptive_calibration_error(PROBS, LABELS, bins=15).item() == pytest.approx(0.5)


def test_aurc_by_hand():
    # by confidence: D miss, A hit, C hit, B miss -> risks 1, 1/2, 1/3, 1/2
    torch.testing.assert_close(risk_coverage_curve(PROBS, LABELS), torch.tensor([1, 0.5, 1 / 3, 0.5], dtype=F64))
    assert aurc(PROBS, LABELS).item() == pytest.approx((1 + 0.5 + 1 / 3 + 0.5) / 4)
    perfect = torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=F64)  # the error is the least confident
    assert aurc(perfect, torch.tensor([0, 1])).item() == pytest.approx(0.25)


@pytest.mark.parametrize("metric", [expected_calibration_error, adaptive_calibration_error, aurc, brier_score])
def test_nan_confidence_gives_nan_not_an_index_error(metric):
    probs = PROBS.clone()
    probs[2, 0] = math.nan
    assert math.isnan(metric(probs, LABELS).item())


def test_metrics_accept_float32_and_any_integer_labels():
    for name, value in calibration_metrics(PROBS.float(), LABELS.int()).items():
        assert value.dtype == F64, name


@pytest.mark.parametrize("probs, labels, match", [
    (PROBS[0], LABELS, r"\[N, K\]"),
    (PROBS, LABELS[:3], r"labels must be an integer tensor \[4\]"),
    (PROBS, LABELS.double(), "integer"),
    (PROBS[:0], LABELS[:0], "at least one sample"),
])
def test_bad_input(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, labels)


def test_bad_bins():
    with pytest.raises(ValueError, match="bins"):
        adaptive_calibration_error(PROBS, LABELS, bins=0)


LOOSE = dict(rtol=1e-6, atol=1e-6)  # torchmetrics accumulates in float32


def _random_case(seed, n, k):
    g = torch.Generator().manual_seed(seed)
    probs = F.softmax(3 * torch.randn(n, k, generator=g, dtype=F64), dim=-1)
    return probs, torch.randint(0, k, (n,), generator=g)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(20, 200), k=st.integers(2, 10), bins=st.integers(1, 20))
def test_agrees_with_torchmetrics_and_torch_uncertainty(seed, n, k, bins):
    # n >= bins: TorchUncertainty leaves empty equal-mass bins as 0/0 when there are fewer samples than bins
    tm = pytest.importorskip("torchmetrics.functional.classification")
    tu = pytest.importorskip("torch_uncertainty.metrics.classification")
    from torch_uncertainty.metrics.classification.calibration.adaptive_calibration_error import _ace_compute
    probs, labels = _random_case(seed, n, k)
    conf, pred = probs.max(-1)
    assert not ((conf * bins) == (conf * bins).round()).any()  # no confidence on a bin edge (tie rules differ)
    torch.testing.assert_close(expected_calibration_error(probs, labels, bins),
                               tm.multiclass_calibration_error(probs, labels, k, n_bins=bins).to(F64), **LOOSE)
    torch.testing.assert_close(adaptive_calibration_error(probs, labels, bins),
                               _ace_compute(conf, (pred == labels).to(F64), bins).to(F64), **LOOSE)
    brier = tu.BrierScore(num_classes=k)
    brier.update(probs, labels)
    torch.testing.assert_close(brier_score(probs, labels), brier.compute().to(F64), **LOOSE)
    reference = tu.AURC()
    reference.update(probs, labels)
    curve = risk_coverage_curve(probs, labels)
    torch.testing.assert_close(curve, reference.partial_compute().to(F64))
    # TorchUncertainty integrates the same curve by trapezoids over [1/N, 1], rescaled by 1/(1 - 1/N)
    trapezoid = (n * aurc(probs, labels) - (curve[0] + curve[-1]) / 2) / (n - 1)
    torch.testing.assert_close(trapezoid, reference.compute().to(F64).reshape(()), **LOOSE)


def test_temperature_by_hand():
    # three copies of logits [c, 0] with labels 0, 0, 1: NLL is minimal where sigmoid(c/T) = 2/3, T = c / log 2
    c = 3.0
    logits = torch.tensor([[c, 0.0]] * 3, dtype=F64)
    assert fit_temperature(logits, torch.tensor([0, 0, 1])) == pytest.approx(c / math.log(2.0), rel=1e-6)


def _calibrated_case(seed, n, k):
    g = torch.Generator().manual_seed(seed)
    probs = F.softmax(2 * torch.randn(n, k, generator=g, dtype=F64), dim=-1)
    return probs, torch.multinomial(probs, 1, generator=g).squeeze(1)  # labels drawn from probs


def test_temperature_is_a_minimum_of_the_nll():
    probs, labels = _calibrated_case(5, 300, 6)
    logits = 4 * probs.log()  # overconfident: T > 1
    t = fit_temperature(logits, labels)
    assert t > 1
    nll = lambda temp: F.cross_entropy(logits / temp, labels).item()  # noqa: E731
    assert nll(t) <= min(nll(t * 0.99), nll(t * 1.01))
    temp = torch.tensor(t, dtype=F64, requires_grad=True)
    F.cross_entropy(logits / temp, labels).backward()
    assert abs(temp.grad.item()) < 1e-6


def test_temperature_rejects_non_finite_logits():
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(torch.tensor([[math.inf, 0.0]]), torch.tensor([0]))


def test_held_out_split_is_disjoint_deterministic_and_complete():
    a = held_out_split(11, 0.5, seed=3)
    b = held_out_split(11, 0.5, seed=3)
    assert torch.equal(a.fit, b.fit) and torch.equal(a.evaluate, b.evaluate)
    assert len(a.fit) == 6 and len(a.evaluate) == 5  # round(5.5) = 6
    assert sorted(torch.cat([a.fit, a.evaluate]).tolist()) == list(range(11))
    assert len(held_out_split(2, 0.99).evaluate) == 1
    with pytest.raises(ValueError, match="num_samples"):
        held_out_split(1)
    with pytest.raises(ValueError, match="fit_fraction"):
        held_out_split(10, 1.0)


def test_temperature_scaled_reports_on_the_held_out_part_only():
    probs, labels = _calibrated_case(9, 400, 5)
    logits = 3 * probs.log()
    out = temperature_scaled(logits, labels, seed=1)
    split = held_out_split(400, 0.5, seed=1)
    assert out["temperature"] == pytest.approx(fit_temperature(logits[split.fit], labels[split.fit]))
    assert out["fit_samples"] == 200 and out["eval_samples"] == 200
    held = F.softmax(logits[split.evaluate], dim=-1)
    assert out["unscaled"]["ece"] == pytest.approx(expected_calibration_error(held, labels[split.evaluate]).item())
    assert out["scaled"]["nll"] < out["unscaled"]["nll"]
    assert out["scaled"]["accuracy"] == out["unscaled"]["accuracy"]  # scaling keeps the argmax


# -- degenerate fits: bounded, never a worse NLL reported silently --------------------------------------


def test_temperature_of_perfectly_separated_logits_stops_at_the_lower_bound():
    # every fitting sample right with a margin: the NLL falls towards T -> 0 (LBFGS returned T = 0.000)
    logits = torch.tensor([[4.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0]] * 4, dtype=F64)
    assert fit_temperature(logits, torch.tensor([0, 1, 2] * 4)) == TEMPERATURE_BOUNDS[0]


def test_temperature_of_uninformative_logits_stops_at_the_upper_bound():
    g = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(400, 4, generator=g, dtype=F64)
    labels = torch.randint(0, 4, (400,), generator=g)  # independent of the logits: T -> inf is the infimum
    assert fit_temperature(logits, labels) == TEMPERATURE_BOUNDS[1]


def test_a_temperature_that_worsens_the_reported_nll_is_not_applied():
    # fitted on separated samples (T -> 0.05), reported on samples the argmax gets wrong: 0.05 would
    # multiply the logits by 20 (NLL 0.17 -> 23.6 in the report that asked for this rule)
    fit = torch.tensor([[4.0, 0.0], [0.0, 4.0]] * 5, dtype=F64)
    held = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 3.0]], dtype=F64)
    out = scaled_on(fit, torch.tensor([0, 1] * 5), held, torch.tensor([1, 1, 0, 1]))
    assert out["fitted_temperature"] == TEMPERATURE_BOUNDS[0] and out["temperature"] == 1.0
    assert out["scaled"] == out["unscaled"]
    assert "the fit stopped at the bound T = 0.05" in out["note"] and "worsens the NLL" in out["note"] and \
        "T = 1 kept" in out["note"]


def test_a_helpful_temperature_is_applied_without_a_note():
    probs, labels = _calibrated_case(9, 400, 5)
    logits = 3 * probs.log()
    out = scaled_on(logits[:200], labels[:200], logits[200:], labels[200:])
    assert out["note"] is None and out["temperature"] == out["fitted_temperature"]
    assert out["temperature"] == pytest.approx(3.0, rel=0.2)  # undoes the factor 3
    assert out["scaled"]["nll"] < out["unscaled"]["nll"]
