"""Calibration and uncertainty metrics of a predictive distribution (TorchUncertainty's set).

Pure functions of (probabilities [N, K] or logits [N, K], labels [N]) returning 0-dim float64
tensors (no host synchronisation, except :func:`fit_temperature`, which optimises):

    brier_score                mean_i sum_k (p_ik - [k = y_i])^2
    expected_calibration_error sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence
                               bins ((m-1)/M, m/M] (Guo et al. 2017; confidence 0 falls in bin 1)
    adaptive_calibration_error the same over equal-mass bins: the samples sorted by confidence,
                               split into M groups of sizes differing by at most one
    aurc                       area under the risk-coverage curve (selective classification,
                               Geifman & El-Yaniv 2017): mean over k = 1..N of the error rate of the
                               k most confident predictions
    fit_temperature            post-hoc temperature scaling (Guo et al. 2017): the T in [0.05, 20]
                               minimising the NLL of softmax(logits / T), by bisection in log space

Confidence is the top-1 probability and the prediction its class (ties: the lowest index).
A NaN anywhere in the probabilities gives a NaN metric (never an IndexError, never a silently
dropped sample).

Temperature scaling must be fitted on data the metrics are not reported on: a validation split
(:func:`scaled_on`: fit on one set, report on another), or, without one, the test set's two
halves under a fixed seed (:func:`held_out_split`; :func:`temperature_scaled` does both).  A
fitted T that makes the reported NLL worse is not applied: T = 1 is reported, with a note.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Confidence bins of the calibration errors (TorchUncertainty's and Guo et al.'s 15).
DEFAULT_BINS = 15

#: The temperatures :func:`fit_temperature` searches.  Beyond them the fit has degenerated: T -> 0
#: (the fitting data are separated perfectly: a hard argmax, infinitely confident elsewhere) or
#: T -> inf (the logits carry no information: the uniform distribution).
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _check(probs: Tensor, labels: Tensor, what: str = "probs") -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor [N, K], got "
                         f"{tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__}")
    if probs.shape[0] == 0:
        raise ValueError(f"{what} must hold at least one sample, got shape {tuple(probs.shape)}")
    if not isinstance(labels, Tensor) or labels.shape != (probs.shape[0],) or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor [{probs.shape[0]}], got {got}")


def _check_bins(bins: int) -> None:
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")


def _nan_if_any_nan(value: Tensor, probs: Tensor) -> Tensor:
    return torch.where(torch.isnan(probs).any(), torch.full_like(value, math.nan), value)


def _confidence_and_hits(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    probs = probs.to(torch.float64)
    confidence, prediction = probs.max(dim=-1)
    return confidence, (prediction == labels).to(torch.float64)


def brier_score(probs: Tensor, labels: Tensor) -> Tensor:
    """mean_i sum_k (p_ik - onehot(y_i)_k)^2, in [0, 2]."""
    _check(probs, labels)
    probs = probs.to(torch.float64)
    onehot = F.one_hot(labels.long(), probs.shape[1]).to(torch.float64)
    return (probs - onehot).square().sum(dim=1).mean()


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> Tensor:
    """ECE over ``bins`` equal-width confidence bins ((m-1)/M, m/M], a fraction in [0, 1]."""
    _check(probs, labels)
    _check_bins(bins)
    confidence, hits = _confidence_and_hits(probs, labels)
    # ceil(c * M) - 1 puts c in ((m-1)/M, m/M]; NaN is sent to bin 0 and poisons the result below.
    index = (torch.nan_to_num(confidence, nan=0.0) * bins).ceil().long().sub_(1).clamp_(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64, device=probs.device)
    gap.index_add_(0, index, confidence - hits)  # sum over the bin of (conf - hit) = |B|(conf - acc)
    return _nan_if_any_nan(gap.abs().sum() / probs.shape[0], probs)


def adaptive_calibration_error(probs: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> Tensor:
    """ECE over ``bins`` equal-mass bins: sorted confidences in groups of sizes ceil/floor(N/M)
    (torch.tensor_split's split: the first N mod M groups are one larger; no empty bins when N < M)."""
    _check(probs, labels)
    _check_bins(bins)
    confidence, hits = _confidence_and_hits(probs, labels)
    order = torch.sort(torch.nan_to_num(confidence, nan=0.0), stable=True).indices
    n = confidence.shape[0]
    groups = min(bins, n)
    position = torch.arange(n, device=probs.device)
    small, extra = divmod(n, groups)  # the first `extra` groups have small + 1 samples
    boundary = extra * (small + 1)
    group = torch.where(position < boundary, position // (small + 1),
                        extra + (position - boundary) // max(small, 1))
    gap = torch.zeros(groups, dtype=torch.float64, device=probs.device)
    gap.index_add_(0, group, (confidence - hits)[order])
    return _nan_if_any_nan(gap.abs().sum() / n, probs)


def risk_coverage_curve(probs: Tensor, labels: Tensor) -> Tensor:
    """[N]: entry k-1 is the error rate of the k most confident predictions (ties: original order)."""
    _check(probs, labels)
    confidence, hits = _confidence_and_hits(probs, labels)
    order = torch.sort(torch.nan_to_num(confidence, nan=-1.0), descending=True, stable=True).indices
    errors = 1.0 - hits[order]
    return errors.cumsum(0) / torch.arange(1, errors.shape[0] + 1, dtype=torch.float64, device=probs.device)


def aurc(probs: Tensor, labels: Tensor) -> Tensor:
    """Area under the risk-coverage curve: (1/N) sum_k risk(k/N). 0 is a perfect ranking of errors last.

    TorchUncertainty's ``AURC`` integrates the same curve by the trapezoid rule over coverage
    [1/N, 1] and rescales by 1/(1 - 1/N): (N * this - (r_1 + r_N)/2) / (N - 1), equal for large N.
    """
    return _nan_if_any_nan(risk_coverage_curve(probs, labels).mean(), probs)


def negative_log_likelihood(probs: Tensor, labels: Tensor) -> Tensor:
    """mean_i -log p_i(y_i) (probabilities clamped at the smallest float64 to stay finite)."""
    _check(probs, labels)
    true = probs.to(torch.float64).gather(1, labels.long()[:, None]).squeeze(1)
    return -true.clamp_min(torch.finfo(torch.float64).tiny).log().mean()


class HeldOutSplit(NamedTuple):
    fit: Tensor  # indices used to fit the temperature
    evaluate: Tensor  # disjoint indices the scaled metrics are reported on


def held_out_split(num_samples: int, fit_fraction: float = 0.5, seed: int = 0) -> HeldOutSplit:
    """A fixed-seed random split of range(num_samples) into a fitting and an evaluation part.

    The first round(fit_fraction * N) indices of a seeded permutation fit the temperature, the
    rest report the metrics; both parts are non-empty and sorted.
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2 (both parts non-empty), got {num_samples!r}")
    if not (isinstance(fit_fraction, float) and 0.0 < fit_fraction < 1.0):
        raise ValueError(f"fit_fraction must be a float in (0, 1), got {fit_fraction!r}")
    fit_count = min(max(round(fit_fraction * num_samples), 1), num_samples - 1)
    permutation = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return HeldOutSplit(permutation[:fit_count].sort().values, permutation[fit_count:].sort().values)


def fit_temperature(logits: Tensor, labels: Tensor, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T in ``bounds`` minimising the mean NLL of softmax(logits / T) over (logits, labels).

    The NLL is convex in 1/T, so its derivative in 1/T, mean_i (E_softmax(z_i / T)[z_i] - z_iy), is
    increasing: T is its root, found by bisection on log T in float64 (to ~1e-13 relative), or the
    bound the minimum lies beyond (T at a bound means the fit degenerated: check the data).  Fit it
    on held-out data, never on the samples the metrics are reported on.
    """
    _check(logits, labels, "logits")
    low_t, high_t = bounds
    if not (0 < low_t < 1 < high_t and math.isfinite(high_t)):
        raise ValueError(f"temperature bounds must satisfy 0 < low < 1 < high < inf, got {bounds!r}")
    logits = logits.detach().to(torch.float64)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite to fit a temperature")
    true = logits.gather(1, labels.long()[:, None]).squeeze(1)

    def slope(log_t: float) -> float:  # d NLL / d(1/T) at T = exp(log_t)
        probs = F.softmax(logits * math.exp(-log_t), dim=-1)
        return float(((probs * logits).sum(dim=1) - true).mean())

    low, high = math.log(low_t), math.log(high_t)  # slope(log T) decreases as T grows
    if slope(high) >= 0:
        return high_t  # the NLL still falls towards T -> inf
    if slope(low) <= 0:
        return low_t  # ... or towards T -> 0
    while high - low > 1e-13:
        middle = 0.5 * (low + high)
        if slope(middle) > 0:
            low = middle
        else:
            high = middle
    return math.exp(0.5 * (low + high))


def calibration_metrics(probs: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> dict[str, Tensor]:
    """Every metric of this module on one distribution [N, K] (0-dim float64 tensors)."""
    _check(probs, labels)
    confidence, hits = _confidence_and_hits(probs, labels)
    return {"accuracy": hits.mean(), "nll": negative_log_likelihood(probs, labels),
            "brier": brier_score(probs, labels), "ece": expected_calibration_error(probs, labels, bins),
            "adaptive_ece": adaptive_calibration_error(probs, labels, bins), "aurc": aurc(probs, labels)}


def scaled_on(fit_logits: Tensor, fit_labels: Tensor, logits: Tensor, labels: Tensor, *,
              bins: int = DEFAULT_BINS) -> dict:
    """Fit T on (fit_logits, fit_labels) and report softmax(logits / T) and softmax(logits) on (logits, labels).

    Returns ``{"temperature": T, "fitted_temperature": T_fit, "fit_samples", "eval_samples", "scaled": {...},
    "unscaled": {...}, "note"}`` with plain floats.  T is T_fit, or 1 when T_fit makes the reported NLL
    worse (``note`` says so); ``note`` also says when T_fit lies on a bound of :data:`TEMPERATURE_BOUNDS`.
    """
    _check(logits, labels, "logits")
    fitted = fit_temperature(fit_logits, fit_labels)
    logits = logits.to(torch.float64)
    unscaled = {k: float(v) for k, v in calibration_metrics(F.softmax(logits, dim=-1), labels, bins).items()}
    scaled = {k: float(v) for k, v in calibration_metrics(F.softmax(logits / fitted, dim=-1), labels, bins).items()}
    notes = []
    if fitted in TEMPERATURE_BOUNDS:
        notes.append(f"the fit stopped at the bound T = {fitted:g} of {list(TEMPERATURE_BOUNDS)} (a degenerate fit)")
    temperature = fitted
    if not scaled["nll"] <= unscaled["nll"]:
        notes.append(f"the fitted T = {fitted:.3f} worsens the NLL ({unscaled['nll']:.4f} -> {scaled['nll']:.4f}): "
                     f"T = 1 kept")
        temperature, scaled = 1.0, dict(unscaled)
    return {"temperature": temperature, "fitted_temperature": fitted, "fit_samples": int(fit_logits.shape[0]),
            "eval_samples": int(logits.shape[0]), "scaled": scaled, "unscaled": unscaled,
            "note": "; ".join(notes) or None}


def temperature_scaled(logits: Tensor, labels: Tensor, *, fit_fraction: float = 0.5, seed: int = 0,
                       bins: int = DEFAULT_BINS) -> dict:
    """:func:`scaled_on` with T fitted on one part of (logits, labels) (:func:`held_out_split`) and the
    metrics reported on the other part."""
    _check(logits, labels, "logits")
    split = held_out_split(logits.shape[0], fit_fraction, seed)
    fit, held = split.fit.to(logits.device), split.evaluate.to(logits.device)
    return scaled_on(logits[fit], labels[fit], logits[held], labels[held], bins=bins)
