"""Test-set evaluation of S branches and their ensembles: accuracy, NLL, disagreement and the
calibration metrics of :mod:`divco.calibration` (ECE, adaptive ECE, Brier score, AURC)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import calibration, ops, vocabulary

#: The ensemble modes evaluated and reported: every mode of the vocabulary that divco.ops
#: implements (all five today, the official max-of-softmax "max_probs" included).
ENSEMBLE_MODES = tuple(m for m in vocabulary.ENSEMBLE_MODES if m in ops.ENSEMBLE_MODES)
DEFAULT_ENSEMBLE = vocabulary.DEFAULT_ENSEMBLE_MODE
#: divco.ops.ensemble returns logits for these modes and probabilities for the others.
_LOGIT_MODES = tuple(m for m in ENSEMBLE_MODES if m not in vocabulary.PROBABILITY_MODES)
ECE_BINS = calibration.DEFAULT_BINS
#: The calibration metrics; records written before them read back as NaN.
CALIBRATION_FIELDS = ("brier", "adaptive_ece", "aurc")


@dataclass(frozen=True)
class Scores:
    acc: float  # top-1 accuracy, a fraction
    nll: float  # mean negative log-likelihood of the true class
    ece: float  # expected calibration error (15 equal-width confidence bins ((m-1)/M, m/M]), a fraction
    brier: float = math.nan  # Brier score, mean over images of sum_k (p_k - onehot_k)^2, in [0, 2]
    adaptive_ece: float = math.nan  # ECE over 15 equal-mass bins, a fraction
    aurc: float = math.nan  # area under the risk-coverage curve (selective classification), a fraction


@dataclass(frozen=True)
class EvaluationResult:
    images: int
    branches: list[Scores]
    ensembles: dict[str, Scores]
    disagreement: Optional[list[list[float]]]  # [S][S] fraction of images two branches label differently

    @property
    def ensemble_acc(self) -> float:
        return self.ensembles[DEFAULT_ENSEMBLE].acc

    @property
    def mean_disagreement(self) -> Optional[float]:
        if self.disagreement is None:
            return None
        S = len(self.disagreement)
        pairs = [self.disagreement[s][t] for s in range(S) for t in range(s + 1, S)]
        return sum(pairs) / len(pairs)

    def to_dict(self) -> dict:
        """The flat record written to metrics.jsonl (prefixed ``test_``)."""
        default = self.ensembles[DEFAULT_ENSEMBLE]
        return {
            "test_images": self.images,
            "test_branch_acc": [b.acc for b in self.branches],
            "test_branch_nll": [b.nll for b in self.branches],
            "test_branch_ece": [b.ece for b in self.branches],
            **{f"test_branch_{name}": [getattr(b, name) for b in self.branches] for name in CALIBRATION_FIELDS},
            "test_ensemble_acc": default.acc,
            "test_nll": default.nll,
            "test_ece": default.ece,
            **{f"test_{name}": getattr(default, name) for name in CALIBRATION_FIELDS},
            "test_ensembles": {mode: asdict(s) for mode, s in self.ensembles.items()},
            "test_disagreement": self.mean_disagreement,
            "test_disagreement_matrix": self.disagreement,
        }

    @classmethod
    def from_dict(cls, record: dict) -> "EvaluationResult":
        S = len(record["test_branch_acc"])
        extra = [record.get(f"test_branch_{name}", [math.nan] * S) for name in CALIBRATION_FIELDS]
        branches = [Scores(*values) for values in zip(record["test_branch_acc"], record["test_branch_nll"],
                                                      record["test_branch_ece"], *extra)]
        ensembles = {mode: Scores(**s) for mode, s in record["test_ensembles"].items()}
        return cls(record["test_images"], branches, ensembles, record["test_disagreement_matrix"])

    def table(self, title: Optional[str] = None) -> str:
        rows = table_rows(self.branches, self.ensembles)
        width = max(len(name) for name, _ in rows)
        lines = [title] if title else []
        lines.append(f"{'test images: ' + str(self.images):<{width}}  {'acc %':>7}  {'NLL':>7}  {'ECE %':>6}  "
                     f"{'aECE %':>6}  {'Brier':>6}  {'AURC %':>6}")
        lines += [f"{name:<{width}}  {100 * s.acc:7.2f}  {s.nll:7.4f}  {100 * s.ece:6.2f}  "
                  f"{100 * s.adaptive_ece:6.2f}  {s.brier:6.4f}  {100 * s.aurc:6.2f}" for name, s in rows]
        if self.disagreement is not None:
            S = len(self.disagreement)
            pairs = [self.disagreement[s][t] for s in range(S) for t in range(s + 1, S)]
            lines.append(f"pairwise disagreement: {100 * self.mean_disagreement:.2f} % mean over {len(pairs)} "
                         f"pair(s) (min {100 * min(pairs):.2f} %, max {100 * max(pairs):.2f} %)")
        return "\n".join(lines)


def table_rows(branches: list, ensembles: dict) -> list[tuple[str, object]]:
    """The named rows of a results table: every branch, then every ensemble mode where there are
    several branches (the ensemble of one network is that network: six copies of its row)."""
    rows = [(f"branch {s}", b) for s, b in enumerate(branches)]
    return rows + ([(f"ensemble {mode}", e) for mode, e in ensembles.items()] if len(branches) > 1 else [])


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> Tensor:
    """divco.calibration's ECE (kept under this name for its callers).

    The former equal-width ECE put a confidence c in bin floor(c * M); divco.calibration puts it
    in ((m-1)/M, m/M] (Guo et al.): the two differ only for a confidence exactly on a bin edge.
    """
    return calibration.expected_calibration_error(probs, labels, bins)


#: The order of the metrics in one row of :func:`_scores` (the fields of :class:`Scores`).
SCORE_FIELDS = ("acc", "nll", "ece") + CALIBRATION_FIELDS


def _scores(probs: Tensor, labels: Tensor) -> Tensor:
    """[acc, nll, ece, brier, adaptive_ece, aurc] of one predictive distribution [N, K] (a device tensor)."""
    metrics = calibration.calibration_metrics(probs.to(torch.float64), labels, ECE_BINS)
    return torch.stack([metrics["accuracy"]] + [metrics[name] for name in SCORE_FIELDS[1:]])


def metrics_from_logits(logits: Tensor, labels: Tensor, backend: Optional[str] = None) -> EvaluationResult:
    """All test metrics of branch logits ``[N, S, K]`` against class labels ``[N]``."""
    if logits.dim() != 3 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits [N, S, K] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    logits = logits.to(torch.float32)
    S = logits.shape[1]
    rows = [_scores(F.softmax(logits[:, s], dim=-1), labels) for s in range(S)]
    for mode in ENSEMBLE_MODES:
        out = ops.ensemble(logits, mode, backend=backend)
        rows.append(_scores(F.softmax(out, dim=-1) if mode in _LOGIT_MODES else out, labels))
    predictions = logits.argmax(dim=-1)  # [N, S]
    disagreement = (predictions[:, :, None] != predictions[:, None, :]).to(torch.float64).mean(0)  # [S, S]
    values = torch.cat([torch.stack(rows).flatten(), disagreement.flatten()]).cpu().tolist()  # one read
    width = len(SCORE_FIELDS)
    scores = [Scores(*values[width * i: width * (i + 1)]) for i in range(len(rows))]
    matrix = values[width * len(rows):]
    return EvaluationResult(
        images=int(logits.shape[0]),
        branches=scores[:S],
        ensembles=dict(zip(ENSEMBLE_MODES, scores[S:])),
        disagreement=[matrix[s * S:(s + 1) * S] for s in range(S)] if S > 1 else None,
    )


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, normalize: Callable[[Tensor], Tensor], *, batch_size: int = 256,
            amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Tensor:
    """Logits ``[N, S, K]`` (float32) of uint8 images ``[N, 3, H, W]``; every branch sees each image."""
    was_training = model.training
    model.eval()
    device_type = images.device.type
    autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    outputs = []
    try:
        with autocast:
            for chunk in images.split(batch_size):
                x = normalize(chunk)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                outputs.append(model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, normalize: Callable[[Tensor], Tensor], *,
             batch_size: int = 256, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             backend: Optional[str] = None) -> EvaluationResult:
    """Evaluate ``model`` on uint8 test images (on the model's device)."""
    logits = predict(model, images, normalize, batch_size=batch_size, amp_dtype=amp_dtype,
                     channels_last=channels_last)
    return metrics_from_logits(logits, labels.to(logits.device), backend=backend)


def evaluate_validation(model: nn.Module, data, normalize: Callable[[Tensor], Tensor], device: torch.device,
                        **options) -> dict:
    """The validation split's metrics as record fields (``val_`` instead of ``test_``); {} without a split.

    ``data`` is an :class:`divco.data.ImageDataset`; ``options`` are :func:`evaluate`'s.
    """
    if data.val_images is None:
        return {}
    result = evaluate(model, data.val_images.to(device), data.val_labels.to(device), normalize, **options)
    return {"val_" + key[len("test_"):]: value for key, value in result.to_dict().items()}


#: Temperature scaling in ``divco eval``: T is fitted on the run's validation split and the metrics are
#: reported on the test set; without a validation split T is fitted on one half of the test set (a seeded
#: permutation, :func:`divco.calibration.held_out_split`) and every metric is reported on the other half.
TEMPERATURE_FIT_FRACTION = 0.5
TEMPERATURE_SEED = 0

#: Ensemble modes temperature scaling does not apply to: vote's output is a share of the branches' votes,
#: 0 for most classes, so softmax(log p / T) has no finite optimum (T grows without bound).
UNSCALED_MODES = ("vote",)


def _as_logits(out: Tensor, mode: str) -> Tensor:
    """What temperature scaling divides: the logits, or the log-probabilities of a probability mode."""
    if mode in _LOGIT_MODES:
        return out.to(torch.float64)
    return out.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny).log()


def _scaled(logits: Tensor, labels: Tensor, seed: int, fit: Optional[tuple[Tensor, Tensor]]) -> dict:
    try:
        if fit is not None:
            return calibration.scaled_on(fit[0], fit[1], logits, labels, bins=ECE_BINS)
        return calibration.temperature_scaled(logits, labels, fit_fraction=TEMPERATURE_FIT_FRACTION, seed=seed,
                                              bins=ECE_BINS)
    except ValueError as error:  # non-finite logits: said, never a guess
        return {"temperature": None, "error": str(error)}


def _mode_rows(logits: Tensor, backend: Optional[str]) -> dict[str, Tensor]:
    return {mode: _as_logits(ops.ensemble(logits, mode, backend=backend), mode) for mode in ENSEMBLE_MODES
            if mode not in UNSCALED_MODES}


def temperature_scaling(logits: Tensor, labels: Tensor, *, seed: int = TEMPERATURE_SEED,
                        backend: Optional[str] = None, fit_logits: Optional[Tensor] = None,
                        fit_labels: Optional[Tensor] = None) -> dict:
    """Post-hoc temperature scaling of every branch and every ensemble mode of logits ``[N, S, K]``.

    With ``fit_logits`` ``[M, S, K]`` and ``fit_labels`` (the validation split) T is fitted on them and the
    metrics are reported on all of (logits, labels); without, T is fitted on a held-out half of the images
    (the same half for every row) and the metrics are reported on the other half
    (:func:`divco.calibration.temperature_scaled`).  T lies in :data:`divco.calibration.TEMPERATURE_BOUNDS`;
    a T that worsens the reported NLL is not applied (T = 1 and a ``note``).  A probability mode's output
    is scaled through its log-probabilities: softmax(log p / T) ∝ p^(1/T); vote is not scaled.  A row whose
    T cannot be fitted carries ``temperature: None`` and the reason (``error``); with fewer than 2 images
    (nothing to hold out) every row does.
    """
    if logits.dim() != 3 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits [N, S, K] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    logits = logits.to(torch.float32)
    N = int(logits.shape[0])
    on_validation = fit_logits is not None
    if on_validation:
        if fit_logits.dim() != 3 or fit_logits.shape[1:] != logits.shape[1:] or fit_labels is None or \
                fit_labels.shape != (fit_logits.shape[0],) or fit_logits.shape[0] < 1:
            raise ValueError(f"expected validation logits [M, {logits.shape[1]}, {logits.shape[2]}] and labels [M], "
                             f"got {tuple(fit_logits.shape)} and "
                             f"{None if fit_labels is None else tuple(fit_labels.shape)}")
        fit_logits, fit_labels = fit_logits.to(torch.float32), fit_labels.to(logits.device)
        fit_images, eval_images = int(fit_logits.shape[0]), N
    else:
        fit_images = len(calibration.held_out_split(N, TEMPERATURE_FIT_FRACTION, seed).fit) if N >= 2 else 0
        eval_images = N - fit_images
    test_modes, fit_modes = _mode_rows(logits, backend), _mode_rows(fit_logits, backend) if on_validation else {}

    def fit_of(rows: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
        return (rows, fit_labels) if on_validation else None

    ensembles = {mode: _scaled(rows, labels, seed, fit_of(fit_modes.get(mode))) for mode, rows in test_modes.items()}
    for mode in UNSCALED_MODES:
        if mode in ENSEMBLE_MODES:
            ensembles[mode] = {"temperature": None, "error": f"{mode}'s output is a share of votes (0 for most "
                                                            f"classes): temperature scaling does not apply"}
    return {
        "fit_on": "validation" if on_validation else "test half",
        "fit_images": fit_images,
        "eval_images": eval_images,
        "seed": seed,
        "branches": [_scaled(logits[:, s].to(torch.float64), labels, seed,
                             fit_of(fit_logits[:, s].to(torch.float64) if on_validation else None))
                     for s in range(logits.shape[1])],
        "ensembles": {mode: ensembles[mode] for mode in ENSEMBLE_MODES},
    }


def temperature_table(report: dict) -> str:
    """Temperature scaling as text: T and NLL / ECE / Brier before -> after on the images reported."""
    rows = table_rows(report["branches"], report["ensembles"])
    width = max(len(name) for name, _ in rows)
    if report.get("fit_on") == "validation":
        title = (f"temperature scaling: T fitted on the {report['fit_images']} validation images, metrics on the "
                 f"{report['eval_images']} test images")
    else:
        title = (f"temperature scaling: T fitted on {report['fit_images']} test images, metrics on the other "
                 f"{report['eval_images']} (seed {report['seed']})")
    lines = [title, f"{'':<{width}}  {'T':>7}  {'NLL':>17}  {'ECE %':>15}  {'Brier':>15}"]
    for name, r in rows:
        if r["temperature"] is None:
            lines.append(f"{name:<{width}}  not fitted: {r['error']}")
            continue
        before, after = r["unscaled"], r["scaled"]
        lines.append(f"{name:<{width}}  {r['temperature']:7.3f}  {before['nll']:7.4f} -> {after['nll']:7.4f}  "
                     f"{100 * before['ece']:6.2f} -> {100 * after['ece']:6.2f}  "
                     f"{before['brier']:6.4f} -> {after['brier']:6.4f}")
        if r.get("note"):
            lines.append(f"{'':<{width}}  note: {r['note']}")
    return "\n".join(lines)
