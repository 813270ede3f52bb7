"""Test-set evaluation of S branches and their ensembles: accuracy, NLL, ECE, disagreement."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .. import vocabulary

#: The ensemble modes evaluated and reported: every mode of the vocabulary that divco.ops
#: implements (the official max-of-softmax "max_probs" once the ops provide it).
ENSEMBLE_MODES = tuple(m for m in vocabulary.ENSEMBLE_MODES if m in ops.ENSEMBLE_MODES)
DEFAULT_ENSEMBLE = vocabulary.DEFAULT_ENSEMBLE_MODE
#: divco.ops.ensemble returns logits for these modes and probabilities for the others.
_LOGIT_MODES = tuple(m for m in ENSEMBLE_MODES if m not in vocabulary.PROBABILITY_MODES)
ECE_BINS = 15


@dataclass(frozen=True)
class Scores:
    acc: float  # top-1 accuracy, a fraction
    nll: float  # mean negative log-likelihood of the true class
    ece: float  # expected calibration error (15 equal-width confidence bins), a fraction


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
            "test_ensemble_acc": default.acc,
            "test_nll": default.nll,
            "test_ece": default.ece,
            "test_ensembles": {mode: asdict(s) for mode, s in self.ensembles.items()},
            "test_disagreement": self.mean_disagreement,
            "test_disagreement_matrix": self.disagreement,
        }

    @classmethod
    def from_dict(cls, record: dict) -> "EvaluationResult":
        branches = [Scores(a, n, e) for a, n, e in zip(record["test_branch_acc"], record["test_branch_nll"],
                                                       record["test_branch_ece"])]
        ensembles = {mode: Scores(**s) for mode, s in record["test_ensembles"].items()}
        return cls(record["test_images"], branches, ensembles, record["test_disagreement_matrix"])

    def table(self, title: Optional[str] = None) -> str:
        rows = [(f"branch {s}", b) for s, b in enumerate(self.branches)]
        rows += [(f"ensemble {mode}", s) for mode, s in self.ensembles.items()]
        width = max(len(name) for name, _ in rows)
        lines = [title] if title else []
        lines.append(f"{'test images: ' + str(self.images):<{width}}  {'acc %':>7}  {'NLL':>7}  {'ECE %':>6}")
        lines += [f"{name:<{width}}  {100 * s.acc:7.2f}  {s.nll:7.4f}  {100 * s.ece:6.2f}" for name, s in rows]
        if self.disagreement is not None:
            S = len(self.disagreement)
            pairs = [self.disagreement[s][t] for s in range(S) for t in range(s + 1, S)]
            lines.append(f"pairwise disagreement: {100 * self.mean_disagreement:.2f} % mean over {len(pairs)} "
                         f"pair(s) (min {100 * min(pairs):.2f} %, max {100 * max(pairs):.2f} %)")
        return "\n".join(lines)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> Tensor:
    """Σ_b |B_b|/N · |acc(B_b) - conf(B_b)| over equal-width confidence bins (0-dim tensor; NaN for NaN input)."""
    confidence, prediction = probs.max(dim=-1)
    hit = (prediction == labels).to(probs.dtype)
    # NaN confidences (a diverged model) go to bin 0, where they make the result NaN: never an index error.
    index = torch.nan_to_num(confidence * bins, nan=0.0).long().clamp_(0, bins - 1)
    count = torch.zeros(bins, dtype=probs.dtype, device=probs.device).index_add_(0, index, torch.ones_like(hit))
    conf_sum = torch.zeros_like(count).index_add_(0, index, confidence)
    hit_sum = torch.zeros_like(count).index_add_(0, index, hit)
    return (conf_sum - hit_sum).abs().sum() / probs.shape[0]


def _scores(probs: Tensor, labels: Tensor) -> Tensor:
    """[acc, nll, ece] of one predictive distribution [N, K] (a device tensor)."""
    probs = probs.to(torch.float64)
    acc = (probs.argmax(dim=-1) == labels).to(torch.float64).mean()
    nll = -probs.gather(1, labels[:, None]).clamp_min(torch.finfo(torch.float64).tiny).log().mean()
    return torch.stack([acc, nll, expected_calibration_error(probs, labels)])


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
    scores = [Scores(*values[3 * i: 3 * i + 3]) for i in range(len(rows))]
    matrix = values[3 * len(rows):]
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
