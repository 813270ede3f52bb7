"""CBNN's SAMME rule, loss weights, checkpoint schedule and resumable state (hand-computed cases)."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from divco.ensembles.boosting import (DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_SHRINKAGE, BoostingState, checkpoint_epochs,
                                      checkpoint_errors, loss_weights, resolve_damping, samme_update, soft_errors)


def uniform(n):
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def test_samme_one_wrong_of_four_three_classes():
    # e = 1/4, alpha = log(3) + log(2) = log 6; the wrong sample's weight x6, then normalised by 9/4.
    out = samme_update(uniform(4), torch.tensor([True, False, False, False]), 3)
    assert out.error == pytest.approx(0.25, abs=1e-15)
    assert out.alpha == pytest.approx(math.log(6.0), abs=1e-14)
    torch.testing.assert_close(out.weights, torch.tensor([2 / 3, 1 / 9, 1 / 9, 1 / 9], dtype=torch.float64))


def test_samme_binary_is_adaboost():
    out = samme_update(uniform(4), torch.tensor([True, False, False, False]), 2)
    assert out.alpha == pytest.approx(math.log(3.0), abs=1e-14)  # log((1-e)/e) + log(1)
    torch.testing.assert_close(out.weights, torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64))


def test_samme_shrinkage_scales_alpha_and_update():
    out = samme_update(uniform(4), torch.tensor([True, False, False, False]), 3, shrinkage=0.5)
    assert out.alpha == pytest.approx(0.5 * math.log(6.0), abs=1e-14)
    raised = 0.25 * math.sqrt(6.0)
    expected = torch.tensor([raised, 0.25, 0.25, 0.25], dtype=torch.float64) / (raised + 0.75)
    torch.testing.assert_close(out.weights, expected)


def test_samme_non_uniform_weights():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    out = samme_update(w, torch.tensor([False, True, False]), 4)
    assert out.error == pytest.approx(0.3)
    assert out.alpha == pytest.approx(math.log(0.7 / 0.3) + math.log(3))
    raised = 0.3 * (0.7 / 0.3) * 3
    torch.testing.assert_close(out.weights, torch.tensor([0.5, raised, 0.2], dtype=torch.float64) / (0.7 + raised))


def test_zero_error_is_clamped_to_a_finite_alpha_and_keeps_weights():
    w = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    out = samme_update(w, torch.zeros(3, dtype=torch.bool), 10, eps=1e-6)
    assert out.error == 0.0
    assert out.alpha == pytest.approx(math.log((1 - 1e-6) / 1e-6) + math.log(9))
    torch.testing.assert_close(out.weights, w)


@pytest.mark.parametrize("K, wrong", [(2, [True, True, False, False]),   # e = 1/2 = (K-1)/K: alpha 0
                                      (3, [True, True, True, False]),    # e = 3/4 > 2/3: alpha < 0 -> 0
                                      (5, [True, True, True, True])])    # e = 1 (clamped to 1 - eps)
def test_chance_level_checkpoint_gets_zero_weight_and_keeps_weights(K, wrong):
    w = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    out = samme_update(w, torch.tensor(wrong), K)
    assert out.alpha == 0.0
    torch.testing.assert_close(out.weights, w)


def test_tiny_error_does_not_overflow():
    n = 10_000
    wrong = torch.zeros(n, dtype=torch.bool)
    wrong[0] = True
    w = torch.full((n,), 1e-30, dtype=torch.float64)
    w[1] = 1 - (n - 1) * 1e-30
    out = samme_update(w, wrong, 1000)  # e = 1e-30 -> alpha ~ 76: exp(alpha) = 1e33, fine in log space
    assert torch.isfinite(out.weights).all() and out.weights.sum().item() == pytest.approx(1.0)


def test_probability_variant_uses_soft_errors():
    p_true = torch.tensor([0.9, 0.5, 0.2, 1.0], dtype=torch.float64)
    errors = soft_errors(p_true)
    torch.testing.assert_close(errors, torch.tensor([0.1, 0.5, 0.8, 0.0], dtype=torch.float64))
    out = samme_update(uniform(4), errors, 3)
    e = 1.4 / 4
    assert out.error == pytest.approx(e)
    alpha = math.log((1 - e) / e) + math.log(2)
    assert out.alpha == pytest.approx(alpha)
    raw = torch.exp(alpha * errors) * 0.25
    torch.testing.assert_close(out.weights, raw / raw.sum())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), K=st.integers(2, 12), seed=st.integers(0, 2**31 - 1))
def test_after_the_update_the_same_checkpoint_is_at_chance_level(n, K, seed):
    # SAMME's defining property: re-weighted, the checkpoint's weighted error is (K-1)/K.
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.01
    w /= w.sum()
    wrong = torch.rand(n, generator=g) < 0.3
    error = float((w * wrong).sum())
    if not 0 < error < (K - 1) / K - 1e-9:
        return
    out = samme_update(w, wrong, K)
    assert float((out.weights * wrong).sum()) == pytest.approx((K - 1) / K, rel=1e-9)
    assert float(out.weights.sum()) == pytest.approx(1.0, abs=1e-12)


class _ScriptedLearner:
    """A stand-in weak learner for scikit-learn's AdaBoost: its i-th fit predicts the i-th script."""

    script: list = []
    calls = 0

    def __init__(self):
        pass

    def get_params(self, deep=True):
        return {}

    def set_params(self, **params):
        return self

    def fit(self, X, y, sample_weight=None):
        self.classes_ = np.unique(y)
        self.n_classes_ = len(self.classes_)
        self.prediction_ = _ScriptedLearner.script[_ScriptedLearner.calls]
        _ScriptedLearner.calls += 1
        return self

    def predict(self, X):
        return self.prediction_


def test_matches_scikit_learn_adaboost_samme():
    ensemble = pytest.importorskip("sklearn.ensemble")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    script = [np.array([0, 1, 2, 0, 1, 2, 1, 0]), np.array([0, 1, 0, 0, 1, 2, 0, 1]),
              np.array([1, 1, 2, 0, 2, 2, 0, 1])]
    _ScriptedLearner.script, _ScriptedLearner.calls = script, 0
    reference = ensemble.AdaBoostClassifier(estimator=_ScriptedLearner(), n_estimators=3, learning_rate=0.7)
    reference.fit(np.zeros((8, 1)), y)
    state = BoostingState(num_samples=8, num_classes=3, epochs=3, checkpoints=3, shrinkage=0.7)
    for prediction in script:
        state.record(torch.from_numpy(prediction != y))
    np.testing.assert_allclose(state.alphas, reference.estimator_weights_, rtol=1e-12)
    np.testing.assert_allclose(state.errors, reference.estimator_errors_, rtol=1e-12)


def test_loss_weights_have_mean_one():
    torch.testing.assert_close(loss_weights(uniform(5)), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(loss_weights(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)),
                               torch.tensor([1.5, 0.75, 0.75], dtype=torch.float64))


@pytest.mark.parametrize("epochs, m, expected", [(300, 3, [100, 200, 300]), (10, 3, [3, 6, 10]), (1, 1, [1]),
                                                 (4, 4, [1, 2, 3, 4]), (7, 2, [3, 7])])
def test_checkpoint_epochs(epochs, m, expected):
    assert checkpoint_epochs(epochs, m) == expected


@pytest.mark.parametrize("epochs, m", [(2, 3), (0, 1), (5, 0), (5.0, 2), (True, 1)])
def test_checkpoint_epochs_rejects_bad_input(epochs, m):
    with pytest.raises(ValueError, match="epochs|checkpoints"):
        checkpoint_epochs(epochs, m)


@pytest.mark.parametrize("weights, wrong, K, match", [
    (torch.tensor([0.5, 0.6], dtype=torch.float64), torch.tensor([True, False]), 3, "sum to 1"),
    (torch.tensor([1.5, -0.5], dtype=torch.float64), torch.tensor([True, False]), 3, "non-negative"),
    (torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([True]), 3, r"shape \[2\]"),
    (torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1.5, 0.0]), 3, r"\[0, 1\]"),
    (torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([math.nan, 0.0]), 3, r"\[0, 1\]"),
    (torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([True, False]), 1, "num_classes"),
    (torch.tensor([1, 0]), torch.tensor([True, False]), 3, "floating-point"),
])
def test_samme_rejects_bad_input(weights, wrong, K, match):
    with pytest.raises(ValueError, match=match):
        samme_update(weights, wrong, K)


def test_state_schedule_and_rounds():
    state = BoostingState(num_samples=4, num_classes=3, epochs=9, checkpoints=3)
    assert state.schedule == [3, 6, 9]
    assert [e for e in range(1, 10) if state.is_checkpoint_epoch(e)] == [3]
    torch.testing.assert_close(state.loss_weights(), torch.ones(4, dtype=torch.float64))
    state.record(torch.tensor([True, False, False, False]))
    assert state.next_checkpoint == 1 and state.is_checkpoint_epoch(6) and not state.is_checkpoint_epoch(3)
    torch.testing.assert_close(state.loss_weights(), torch.tensor([8 / 3, 4 / 9, 4 / 9, 4 / 9], dtype=torch.float64))
    state.record(torch.tensor([False, True, False, False]))
    state.record(torch.tensor([False, False, False, False]))
    assert state.done and not state.is_checkpoint_epoch(9)
    assert sum(state.ensemble_weights()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="already taken"):
        state.record(torch.tensor([False, False, False, False]))


def test_state_checks_the_error_kind():
    with pytest.raises(ValueError, match="bool"):
        BoostingState(4, 3, 3, 3).record(torch.zeros(4))
    with pytest.raises(ValueError, match="soft errors"):
        BoostingState(4, 3, 3, 3, error_kind="probability").record(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="error_kind"):
        BoostingState(4, 3, 3, 3, error_kind="hinge")


def test_all_zero_alphas_have_no_ensemble_weights():
    state = BoostingState(2, 2, 1, 1)
    state.record(torch.tensor([True, True]))
    assert state.alphas == [0.0]
    with pytest.raises(ValueError, match="positive weight"):
        state.ensemble_weights()


def _roundtrip(record: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(record, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # a plain dict loads under the safe loader


def test_resume_mid_run_keeps_weights_and_alphas_exactly():
    g = torch.Generator().manual_seed(3)
    rounds = [torch.rand(50, generator=g) < p for p in (0.2, 0.3, 0.25)]
    straight = BoostingState(50, 10, 30, 3)
    for wrong in rounds:
        straight.record(wrong)
    resumed = BoostingState(50, 10, 30, 3)
    resumed.record(rounds[0])
    resumed = BoostingState.from_dict(_roundtrip(resumed.to_dict()))
    assert resumed.next_checkpoint == 1 and resumed.is_checkpoint_epoch(20)
    for wrong in rounds[1:]:
        resumed.record(wrong)
    assert torch.equal(resumed.weights, straight.weights)
    assert resumed.alphas == straight.alphas and resumed.errors == straight.errors


def test_from_dict_rejects_damaged_state():
    record = BoostingState(4, 3, 3, 3).to_dict()
    with pytest.raises(ValueError, match="keys"):
        BoostingState.from_dict({k: v for k, v in record.items() if k != "alphas"})
    with pytest.raises(ValueError, match="inconsistent"):
        BoostingState.from_dict({**record, "next_checkpoint": 1})
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        BoostingState.from_dict({**record, "weights": uniform(5)})


def test_checkpoint_errors_from_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])  # top-1: 0, 2, 0 (tie -> 0)
    labels = torch.tensor([0, 1, 1])
    assert checkpoint_errors(logits, labels).tolist() == [False, True, True]
    assert checkpoint_errors(logits[:, None], labels).tolist() == [False, True, True]  # [N, 1, K] as a model gives
    p_true = torch.softmax(logits.double(), -1)[torch.arange(3), labels]
    torch.testing.assert_close(checkpoint_errors(logits, labels, "probability"), 1 - p_true)
    with pytest.raises(ValueError, match="error_kind"):
        checkpoint_errors(logits, labels, "hinge")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        checkpoint_errors(logits[None], labels)


# -- the damping: the cap on max(w) / min(w) --------------------------------------------------------


def test_weight_ratio_cap_one_wrong_of_four_three_classes():
    # SAMME would raise the wrong sample x6 (alpha = log 6, the first test above); the cap R = 4 holds it
    # at 4 times the others: [4, 1, 1, 1] / 7. alpha (its ensemble weight) is SAMME's either way.
    out = samme_update(uniform(4), torch.tensor([True, False, False, False]), 3, max_weight_ratio=4.0)
    assert out.alpha == pytest.approx(math.log(6.0), abs=1e-14)
    torch.testing.assert_close(out.weights, torch.tensor([4 / 7, 1 / 7, 1 / 7, 1 / 7], dtype=torch.float64))


def test_weight_ratio_cap_above_the_raise_changes_nothing():
    wrong = torch.tensor([True, False, False, False])
    capped = samme_update(uniform(4), wrong, 3, max_weight_ratio=6.5)  # x6 < 6.5: not reached
    torch.testing.assert_close(capped.weights, samme_update(uniform(4), wrong, 3).weights)


def test_weight_ratio_cap_compounds_no_further():
    # Two rounds, the same sample wrong twice: SAMME gives it 6 * 6 / ... ; the cap keeps it at R = 4.
    state = BoostingState(4, 3, 6, 2, max_weight_ratio=4.0)
    state.record(torch.tensor([True, False, False, False]))
    state.record(torch.tensor([True, False, False, False]))
    torch.testing.assert_close(state.weights, torch.tensor([4 / 7, 1 / 7, 1 / 7, 1 / 7], dtype=torch.float64))
    # a second sample wrong in round 2 joins it at the cap: [4, 4, 1, 1] / 10 (its raise x exp(alpha_2) >= 4)
    state = BoostingState(4, 3, 6, 2, max_weight_ratio=4.0)
    state.record(torch.tensor([True, False, False, False]))
    out = state.record(torch.tensor([False, True, False, False]))
    e2 = 1 / 7
    assert out.error == pytest.approx(e2) and out.alpha == pytest.approx(math.log((1 - e2) / e2) + math.log(2))
    torch.testing.assert_close(state.weights, torch.tensor([0.4, 0.4, 0.1, 0.1], dtype=torch.float64))


def _misclassified_mass_and_spread(max_weight_ratio, rounds, n, K, seed):
    """Run ``rounds`` boosting rounds on random wrong masks (a few % wrong, as a well-fitted network's
    training set): the misclassified images' weight after each update and the final max/min ratio."""
    g = torch.Generator().manual_seed(seed)
    state = BoostingState(n, K, rounds, rounds, max_weight_ratio=max_weight_ratio)
    masses = []
    for _ in range(rounds):
        wrong = torch.rand(n, generator=g) < 0.03
        wrong[0] = True  # at least one wrong image
        result = state.record(wrong)
        masses.append((float((state.weights * wrong).sum()), int(wrong.sum()), result.alpha))
    return masses, float(state.weights.max() / state.weights.min())


@pytest.mark.parametrize("max_weight_ratio", [None, 4.0])  # None: plain SAMME, which breaks the bound
@settings(max_examples=25, deadline=None)
@given(n=st.integers(50, 400), K=st.integers(2, 100), rounds=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_weight_ratio_cap_bounds_the_misclassified_mass(max_weight_ratio, n, K, rounds, seed):
    # The property the cap is designed for: after any update, max(w)/min(w) <= R, so m misclassified
    # images of n hold at most m R / (m R + n - m) of the weight, whatever their error; plain SAMME
    # gives them (K-1)/K whatever the error (90 % for K = 10, 99 % for K = 100).
    masses, spread = _misclassified_mass_and_spread(max_weight_ratio, rounds, n, K, seed)
    bound_ratio = 4.0
    if max_weight_ratio is None:  # SAMME: the bound fails, the mass is (K-1)/K
        mass, m, alpha = masses[-1]
        if alpha == 0:  # an error no better than chance (possible at K = 2): SAMME leaves the weights
            return
        assert mass == pytest.approx((K - 1) / K, rel=1e-9)
        assert K == 2 or mass > m * bound_ratio / (m * bound_ratio + n - m)
        return
    assert spread <= bound_ratio * (1 + 1e-12)
    for mass, m, _ in masses:
        assert mass <= m * bound_ratio / (m * bound_ratio + n - m) + 1e-12


def test_the_cbnn_default_bounds_the_misclassified_mass():
    # What `--method cbnn` trains with when no damping option is given (resolve_damping(None, None)):
    # 5 of 1000 CIFAR-100-like images wrong keep a bounded share, not SAMME's 99 %.
    shrinkage, max_weight_ratio = resolve_damping(None, None)
    wrong = torch.zeros(1000, dtype=torch.bool)
    wrong[:5] = True
    out = samme_update(uniform(1000), wrong, 100, shrinkage=shrinkage, max_weight_ratio=max_weight_ratio)
    assert float(out.weights[wrong].sum()) <= 5 * DEFAULT_MAX_WEIGHT_RATIO / (5 * DEFAULT_MAX_WEIGHT_RATIO + 995) + 1e-12
    assert float(out.weights[wrong].sum()) < 0.1


def test_resolve_damping():
    assert resolve_damping(None, None) == (DEFAULT_SHRINKAGE, DEFAULT_MAX_WEIGHT_RATIO)
    assert resolve_damping(1.0, 0) == (1.0, None)  # 0: no cap, plain SAMME
    assert resolve_damping(0.5, 2.5) == (0.5, 2.5)
    with pytest.raises(ValueError, match="max_weight_ratio"):
        resolve_damping(None, 0.5)


@pytest.mark.parametrize("bad", [0.99, 0.0, -2.0, math.inf, math.nan, True, "4"])
def test_weight_ratio_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="max_weight_ratio"):
        samme_update(uniform(2), torch.tensor([True, False]), 3, max_weight_ratio=bad)
    with pytest.raises(ValueError, match="max_weight_ratio"):
        BoostingState(2, 3, 1, 1, max_weight_ratio=bad)


def test_resume_with_the_cap_continues_exactly():
    g = torch.Generator().manual_seed(5)
    rounds = [torch.rand(60, generator=g) < p for p in (0.1, 0.05, 0.08)]
    straight = BoostingState(60, 10, 30, 3, shrinkage=0.5, max_weight_ratio=3.0)
    for wrong in rounds:
        straight.record(wrong)
    resumed = BoostingState(60, 10, 30, 3, shrinkage=0.5, max_weight_ratio=3.0)
    resumed.record(rounds[0])
    record = _roundtrip(resumed.to_dict())
    assert record["max_weight_ratio"] == 3.0
    resumed = BoostingState.from_dict(record)
    for wrong in rounds[1:]:
        resumed.record(wrong)
    assert resumed.max_weight_ratio == 3.0
    assert torch.equal(resumed.weights, straight.weights)
    assert resumed.alphas == straight.alphas and resumed.errors == straight.errors


def test_a_state_saved_before_the_cap_resumes_as_plain_samme():
    old = BoostingState(4, 3, 3, 3).to_dict()
    del old["max_weight_ratio"]  # the record of a run checkpointed before the option existed
    state = BoostingState.from_dict(old)
    assert state.max_weight_ratio is None
    with pytest.raises(ValueError, match="keys"):
        BoostingState.from_dict({**old, "stray": 1})
