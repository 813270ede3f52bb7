"""CBNN: boosting by checkpoints (Wang et al., NeurIPS 2021), read as SAMME applied to checkpoints.

One training run saves M checkpoints at equal intervals. At each checkpoint j the model
(eval mode) predicts the un-augmented training set and

    e_j     = sum_i w_i * wrong_i                      (weights w summing to 1)
    alpha_j = shrinkage * (log((1 - e_j) / e_j) + log(K - 1))     (SAMME, multi-class AdaBoost)
    w_i    <- w_i * exp(alpha_j * wrong_i), then normalised to sum 1

Training continues with the new weights in the loss (as per-sample loss weights with mean 1,
see :func:`loss_weights`); the final ensemble is the alpha-weighted mean of the checkpoints'
probabilities. This is divco's reading of the paper (its Algorithm 1 could not be read and no
public implementation was found: docs/ENSEMBLES.md); the rule lives in :func:`samme_update` only.

Damping (``max_weight_ratio`` R, :func:`cap_weight_ratio`): plain SAMME leaves the misclassified
samples (K-1)/K of the weight after every update whatever their error, so once a checkpoint's
training error is small the next interval trains on a handful of images. With R the updated
log-weights are capped at min + log R: max(w) / min(w) <= R after every update, so m wrong samples
of N hold at most m R / (m R + N - m) of the weight. ``--method cbnn`` uses
:data:`DEFAULT_SHRINKAGE` and :data:`DEFAULT_MAX_WEIGHT_RATIO` unless told otherwise
(:func:`resolve_damping`; ``--cbnn-weight-ratio 0`` is plain SAMME).

Variants (:data:`ERROR_KINDS`):
  ``"zero_one"``     wrong_i in {0, 1}: the top-1 prediction differs from the label (the paper's rule);
  ``"probability"``  wrong_i = 1 - p_i(true class) in [0, 1], a soft error (the same formulas with
                     a real-valued wrong_i; every sample's weight moves, by how unsure the model was).

Edge cases, decided once here:
  * e_j is clamped to [eps, 1 - eps] before alpha is computed, so a checkpoint with no error
    (e_j = 0) gets a large finite alpha (log((1-eps)/eps) + log(K-1)), never inf or NaN.
  * e_j >= (K-1)/K (no better than guessing among K classes) would make alpha <= 0. SAMME
    discards such a learner; a checkpoint cannot be un-trained, so it gets alpha_j = 0: weight 0
    in the ensemble, and the sample weights stay as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..vocabulary import check_choice

#: How a checkpoint's per-sample error is measured (see the module docstring).
ERROR_KINDS: tuple[str, ...] = ("zero_one", "probability")

#: The lr schedule of a cbnn run: the recipe's restarted in every member interval, or the recipe's over the run.
SCHEDULES: tuple[str, ...] = ("restarts", "recipe")
DEFAULT_SCHEDULE = "restarts"

#: The members' ensemble weights: fitted on held-out data (divco.ensembles.heldout), or SAMME's alphas.
MEMBER_WEIGHTINGS: tuple[str, ...] = ("validation", "alpha")

#: Default clamp of the weighted error e_j into [eps, 1 - eps].
ERROR_EPS = 1e-10

#: The damping of ``--method cbnn`` when the run names none (see docs/ENSEMBLES.md for the measurement
#: that chose it): the shrinkage on alpha and the cap on max(w) / min(w) (None: no cap).
DEFAULT_SHRINKAGE = 1.0
DEFAULT_MAX_WEIGHT_RATIO: Optional[float] = 4.0

#: Tolerance on "the weights sum to 1".
_SUM_TOLERANCE = 1e-6


class BoostingRound(NamedTuple):
    alpha: float  # the checkpoint's ensemble weight alpha_j (>= 0)
    error: float  # its weighted error e_j as measured (before the clamp)
    weights: Tensor  # the updated sample weights [N], float64, summing to 1


def _check_weights(weights: Tensor) -> Tensor:
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(f"weights must be a non-empty 1-d tensor [N], got "
                         f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be a floating-point tensor, got {weights.dtype}")
    weights = weights.to(torch.float64)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    total = float(weights.sum())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"weights must sum to 1 (they are a distribution over the training set), got sum {total!r}")
    return weights


def _check_errors(errors: Tensor, n: int, kind: str) -> Tensor:
    if not isinstance(errors, Tensor) or errors.shape != (n,):
        raise ValueError(f"{'wrong' if kind == 'zero_one' else 'errors'} must be a tensor of shape [{n}] "
                         f"(one entry per sample weight), got "
                         f"{tuple(errors.shape) if isinstance(errors, Tensor) else type(errors).__name__}")
    if kind == "zero_one":
        if errors.dtype != torch.bool:
            raise ValueError(f"wrong must be a bool tensor (True where the checkpoint's top-1 is wrong), "
                             f"got {errors.dtype}")
        return errors.to(torch.float64)
    errors = errors.to(torch.float64)
    if not bool(((errors >= 0) & (errors <= 1)).all()):  # also rejects NaN
        raise ValueError("soft errors 1 - p(true class) must lie in [0, 1]")
    return errors


def _check_weight_ratio(max_weight_ratio: Optional[float]) -> Optional[float]:
    if max_weight_ratio is None:
        return None
    if not (isinstance(max_weight_ratio, (int, float)) and not isinstance(max_weight_ratio, bool)
            and math.isfinite(max_weight_ratio) and max_weight_ratio >= 1):
        raise ValueError(f"max_weight_ratio must be a finite number >= 1 (or None: no cap), got {max_weight_ratio!r}")
    return float(max_weight_ratio)


def resolve_damping(shrinkage: Optional[float], weight_ratio: Optional[float]) -> tuple[float, Optional[float]]:
    """(shrinkage, max_weight_ratio) of a run's options: None takes the default; a weight ratio of 0
    means no cap (plain SAMME with ``shrinkage`` 1)."""
    shrinkage = DEFAULT_SHRINKAGE if shrinkage is None else float(shrinkage)
    if weight_ratio is None:
        return shrinkage, DEFAULT_MAX_WEIGHT_RATIO
    return shrinkage, (None if weight_ratio == 0 else _check_weight_ratio(weight_ratio))


def cap_weight_ratio(log_weights: Tensor, max_weight_ratio: Optional[float]) -> Tensor:
    """Log-weights with max(w) / min(w) <= ``max_weight_ratio``: the log-weights above
    min + log(ratio) are lowered to it (None: unchanged). Not normalised."""
    if max_weight_ratio is None:
        return log_weights
    return torch.minimum(log_weights, log_weights.min() + math.log(max_weight_ratio))


def samme_update(weights: Tensor, wrong: Tensor, num_classes: int, *, shrinkage: float = 1.0,
                 max_weight_ratio: Optional[float] = None, eps: float = ERROR_EPS) -> BoostingRound:
    """One boosting round at a checkpoint: (alpha_j, e_j, new normalised weights).

    ``weights`` [N] sum to 1. ``wrong`` [N] is either bool (True where the checkpoint's top-1
    prediction is wrong: the paper's 0/1 rule) or floating point in [0, 1] (the soft error
    1 - p(true class) of the "probability" variant, see :func:`soft_errors`). ``shrinkage``
    (> 0) multiplies alpha, in the ensemble weight and in the update alike (as scikit-learn's
    ``learning_rate``). ``max_weight_ratio`` R (>= 1, None: no cap) bounds the new weights'
    spread: max(w) / min(w) <= R (:func:`cap_weight_ratio`); alpha is SAMME's either way. See the
    module docstring for e_j = 0 and e_j >= (K-1)/K.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not (isinstance(shrinkage, (int, float)) and math.isfinite(shrinkage) and shrinkage > 0):
        raise ValueError(f"shrinkage must be a finite number > 0, got {shrinkage!r}")
    if not (isinstance(eps, float) and 0 < eps < 0.5):
        raise ValueError(f"eps must be a float in (0, 0.5), got {eps!r}")
    max_weight_ratio = _check_weight_ratio(max_weight_ratio)
    weights = _check_weights(weights)
    kind = "zero_one" if isinstance(wrong, Tensor) and wrong.dtype == torch.bool else "probability"
    errors = _check_errors(wrong, weights.shape[0], kind).to(weights.device)

    error = float((weights * errors).sum())
    clamped = min(max(error, eps), 1.0 - eps)
    alpha = shrinkage * (math.log((1.0 - clamped) / clamped) + math.log(num_classes - 1))
    if alpha <= 0.0:  # no better than chance: weight 0, sample weights unchanged
        return BoostingRound(0.0, error, weights / weights.sum())
    # In log space: exp(alpha) can overflow for a tiny e_j, the normalised weights cannot.
    log_weights = cap_weight_ratio(weights.log() + alpha * errors, max_weight_ratio)
    updated = torch.softmax(log_weights, dim=0)
    return BoostingRound(alpha, error, updated)


def soft_errors(true_class_probs: Tensor) -> Tensor:
    """The "probability" variant's per-sample error: 1 - p(true class), float64."""
    return 1.0 - true_class_probs.to(torch.float64)


def checkpoint_errors(logits: Tensor, labels: Tensor, error_kind: str = "zero_one") -> Tensor:
    """The per-sample errors of a checkpoint's training-set logits [N, K] (or [N, 1, K]) for
    :func:`samme_update`: bool wrong[N] ("zero_one") or 1 - p(true class) ("probability")."""
    check_choice("error_kind", error_kind, ERROR_KINDS)
    if isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor [N, K] or [N, 1, K], got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if not isinstance(labels, Tensor) or labels.shape != (logits.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices [{logits.shape[0]}], got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    labels = labels.long().to(logits.device)
    if error_kind == "zero_one":
        return logits.argmax(dim=-1) != labels
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    return soft_errors(probs.gather(1, labels[:, None]).squeeze(1))


def loss_weights(weights: Tensor) -> Tensor:
    """Per-sample loss weights with mean 1 over the data set: w_i * N / sum(w).

    With uniform boosting weights every loss weight is 1, so the first interval trains
    exactly as an unweighted run does.
    """
    weights = weights.to(torch.float64)
    return weights * (weights.shape[0] / weights.sum())


def checkpoint_epochs(epochs: int, checkpoints: int) -> list[int]:
    """The epochs after which CBNN checkpoints: M equal intervals of E epochs, the last at E.

    Checkpoint j (1-based) is taken after epoch floor(j * E / M); e.g. E=300, M=3 -> [100, 200, 300]
    and E=10, M=3 -> [3, 6, 10].
    """
    for name, value in (("epochs", epochs), ("checkpoints", checkpoints)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if checkpoints > epochs:
        raise ValueError(f"{checkpoints} checkpoints need at least {checkpoints} epochs (one per interval), "
                         f"got {epochs}")
    return [j * epochs // checkpoints for j in range(1, checkpoints + 1)]


@dataclass
class BoostingState:
    """Everything CBNN carries across checkpoints; :meth:`to_dict` / :meth:`from_dict` for resume.

    ``weights`` [N] (float64, sum 1) are the current sample weights, ``alphas`` and
    ``errors`` the rounds done so far, ``next_checkpoint`` the 0-based index into
    :attr:`schedule` of the next checkpoint to take.
    """

    num_samples: int
    num_classes: int
    epochs: int
    checkpoints: int
    shrinkage: float = 1.0
    error_kind: str = "zero_one"
    max_weight_ratio: Optional[float] = None
    weights: Optional[Tensor] = None
    alphas: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    next_checkpoint: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_samples, int) or isinstance(self.num_samples, bool) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {self.num_samples!r}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        check_choice("error_kind", self.error_kind, ERROR_KINDS)
        if not (isinstance(self.shrinkage, (int, float)) and math.isfinite(self.shrinkage) and self.shrinkage > 0):
            raise ValueError(f"shrinkage must be a finite number > 0, got {self.shrinkage!r}")
        self.max_weight_ratio = _check_weight_ratio(self.max_weight_ratio)
        self.schedule = checkpoint_epochs(self.epochs, self.checkpoints)
        if self.weights is None:
            self.weights = torch.full((self.num_samples,), 1.0 / self.num_samples, dtype=torch.float64)
        elif self.weights.shape != (self.num_samples,):
            raise ValueError(f"weights must have shape [{self.num_samples}], got {tuple(self.weights.shape)}")
        else:
            self.weights = _check_weights(self.weights)
        if len(self.alphas) != len(self.errors) or len(self.alphas) != self.next_checkpoint:
            raise ValueError(f"inconsistent state: {len(self.alphas)} alphas, {len(self.errors)} errors, "
                             f"next_checkpoint {self.next_checkpoint}")
        if not 0 <= self.next_checkpoint <= self.checkpoints:
            raise ValueError(f"next_checkpoint must be in [0, {self.checkpoints}], got {self.next_checkpoint}")

    @property
    def done(self) -> bool:
        return self.next_checkpoint == self.checkpoints

    def is_checkpoint_epoch(self, epochs_done: int) -> bool:
        """Whether a checkpoint is due after ``epochs_done`` completed epochs."""
        return not self.done and self.schedule[self.next_checkpoint] == epochs_done

    def loss_weights(self) -> Tensor:
        """The current per-sample loss weights (mean 1), float64 [N], indexed like the training set."""
        return loss_weights(self.weights)

    def record(self, wrong: Tensor) -> BoostingRound:
        """Take the next checkpoint's round: ``wrong`` as for :func:`samme_update` (bool for
        "zero_one", soft errors for "probability")."""
        if self.done:
            raise ValueError(f"all {self.checkpoints} checkpoints are already taken")
        expect_bool = self.error_kind == "zero_one"
        if not isinstance(wrong, Tensor) or (wrong.dtype == torch.bool) != expect_bool:
            raise ValueError(f"error_kind {self.error_kind!r} takes "
                             f"{'a bool tensor wrong[N]' if expect_bool else 'soft errors 1 - p(true class) [N]'}, got "
                             f"{wrong.dtype if isinstance(wrong, Tensor) else type(wrong).__name__}")
        result = samme_update(self.weights, wrong, self.num_classes, shrinkage=float(self.shrinkage),
                              max_weight_ratio=self.max_weight_ratio)
        self.weights = result.weights.cpu()
        self.alphas.append(result.alpha)
        self.errors.append(result.error)
        self.next_checkpoint += 1
        return result

    def ensemble_weights(self) -> list[float]:
        """The checkpoints' alphas normalised to sum 1 (a ValueError when every alpha is 0)."""
        total = sum(self.alphas)
        if not self.alphas or total <= 0:
            raise ValueError(f"no checkpoint with a positive weight yet (alphas {self.alphas})")
        return [a / total for a in self.alphas]

    def to_dict(self) -> dict:
        """A plain dict (a CPU tensor, numbers, strings, lists) for a checkpoint file."""
        return {"num_samples": self.num_samples, "num_classes": self.num_classes, "epochs": self.epochs,
                "checkpoints": self.checkpoints, "shrinkage": float(self.shrinkage), "error_kind": self.error_kind,
                "max_weight_ratio": self.max_weight_ratio, "weights": self.weights.detach().cpu().clone(), "alphas": list(self.alphas),
                "errors": list(self.errors), "next_checkpoint": self.next_checkpoint}

    @classmethod
    def from_dict(cls, record: dict) -> "BoostingState":
        expected = {"num_samples", "num_classes", "epochs", "checkpoints", "shrinkage", "error_kind",
                    "max_weight_ratio", "weights", "alphas", "errors", "next_checkpoint"}
        # A state written before the weight-ratio cap existed lacks its key: that run had no cap.
        keys = set(record) | {"max_weight_ratio"} if isinstance(record, dict) else None
        if keys != expected:
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"a CBNN state needs exactly the keys {sorted(expected)}, got {got}")
        values = {"max_weight_ratio": None, **record}
        values["alphas"] = [float(a) for a in record["alphas"]]
        values["errors"] = [float(e) for e in record["errors"]]
        return cls(**values)

