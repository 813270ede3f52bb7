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
    fit_temperature            post-hoc temperature scaling (Guo et al. 2017): the T > 0 minimising
                               the NLL of softmax(logits / T), by LBFGS on log T

Confidence is the top-1 probability and the prediction its class (ties: the lowest index).
A NaN anywhere in the probabilities gives a NaN metric (never an IndexError, never a silently
dropped sample).

Temperature scaling must be fitted on data the metrics are not reported on: the usual split is
the test set's two halves under a fixed seed, :func:`held_out_split` (fit on one, report on the
other); :func:`temperature_scaled` does both.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Confidence bins of the calibration errors (TorchUncertainty's and Guo et al.'s 15).
DEFAULT_BINS = 15


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


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising mean NLL of softmax(logits / T) over (logits, labels).

    LBFGS (strong-Wolfe line search) on log T in float64, starting from T = 1. Fit it on
    held-out data (:func:`held_out_split`), never on the samples the metrics are reported on.
    Logits that carry no information about the labels make the uniform distribution optimal:
    T then grows very large (the NLL's infimum is at T -> inf), and that large T is returned.
    """
    _check(logits, labels, "logits")
    logits = logits.detach().to(torch.float64)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite to fit a temperature")
    labels = labels.long()
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits * torch.exp(-log_t), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature scaling diverged (T = {temperature}); the logits may separate the "
                         f"classes perfectly")
    return temperature


def calibration_metrics(probs: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> dict[str, Tensor]:
    """Every metric of this module on one distribution [N, K] (0-dim float64 tensors)."""
    _check(probs, labels)
    confidence, hits = _confidence_and_hits(probs, labels)
    return {"accuracy": hits.mean(), "nll": negative_log_likelihood(probs, labels),
            "brier": brier_score(probs, labels), "ece": expected_calibration_error(probs, labels, bins),
            "adaptive_ece": adaptive_calibration_error(probs, labels, bins), "aurc": aurc(probs, labels)}


def temperature_scaled(logits: Tensor, labels: Tensor, *, fit_fraction: float = 0.5, seed: int = 0,
                       bins: int = DEFAULT_BINS) -> dict:
    """Fit T on one part of (logits, labels) (:func:`held_out_split`) and report the metrics of
    softmax(logits / T) and of softmax(logits) on the other part.

    Returns ``{"temperature": T, "fit_samples": n_fit, "eval_samples": n_eval, "scaled": {...},
    "unscaled": {...}}`` with plain floats.
    """
    _check(logits, labels, "logits")
    split = held_out_split(logits.shape[0], fit_fraction, seed)
    fit, held = split.fit.to(logits.device), split.evaluate.to(logits.device)
    temperature = fit_temperature(logits[fit], labels[fit])
    held_logits = logits[held].to(torch.float64)
    scaled = calibration_metrics(F.softmax(held_logits / temperature, dim=-1), labels[held], bins)
    unscaled = calibration_metrics(F.softmax(held_logits, dim=-1), labels[held], bins)
    return {"temperature": temperature, "fit_samples": int(fit.numel()), "eval_samples": int(held.numel()),
            "scaled": {k: float(v) for k, v in scaled.items()}, "unscaled": {k: float(v) for k, v in unscaled.items()}}
