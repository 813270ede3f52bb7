"""Objectives: the loss a TrainStep minimises, from the logits ``[B, S, K]`` of a batch and its targets.

A training method (divco.train.methods) chooses its objective (``TrainingMethod.objective``); the step
only calls it, so the step knows no method. Both return :class:`divco.ops.CotrainLoss` (loss,
per-branch cross-entropies, co-training term, top-1 hits, ensemble logits), which the step's
running metrics sum.

CotrainingObjective
    Every branch sees the same images and targets ``[B]`` / ``[B, K]``: Σ_s CE_s + weight · J, one
    fused operator (:func:`divco.ops.cotrain_loss`); optional per-image weights ``[B]`` (cbnn).
PerBranchObjective
    Branch s sees images of its own, with targets ``[B, S]`` / ``[B, S, K]`` (independent networks):
    Σ_s CE_s with no co-training term, and no ensemble accuracy (no image is seen by every branch).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor

from .. import ops


class Objective(Protocol):
    """What TrainStep calls: the loss outputs of a batch's logits and targets (and per-image weights)."""

    #: Whether every branch sees the batch's images, so that their ensemble has a training accuracy.
    scores_ensemble: bool

    def __call__(self, logits: Tensor, targets: Tensor,
                 sample_weight: Optional[Tensor] = None) -> ops.CotrainLoss: ...


class CotrainingObjective:
    """Σ_s CE_s + weight · J of logits ``[B, S, K]`` against targets ``[B]`` / ``[B, K]``.

    ``cot_weight`` is a 0-dim device tensor the run updates in place (a warm-up never retraces a
    compiled step); ``kind``, ``temperature`` and ``backend`` are :func:`divco.ops.cotrain_loss`'s.
    """

    #: The branches see the same images: their ensemble has a training accuracy.
    scores_ensemble = True

    def __init__(self, cot_weight: Tensor, *, kind: str = "js", temperature: float = 1.0,
                 backend: Optional[str] = None) -> None:
        self.cot_weight, self.kind, self.temperature, self.backend = cot_weight, kind, temperature, backend

    def __call__(self, logits: Tensor, targets: Tensor, sample_weight: Optional[Tensor] = None) -> ops.CotrainLoss:
        """``sample_weight`` [B] (cbnn) weighs each image's loss terms: each becomes mean_n w_n loss_n
        (the weights have mean 1 over the training set). The one place where sample weights enter the loss."""
        return ops.cotrain_loss(logits, targets, weight=self.cot_weight, kind=self.kind,
                                temperature=self.temperature, sample_weight=sample_weight, backend=self.backend)


class PerBranchObjective:
    """Σ_s CE_s of logits ``[B, S, K]`` against per-branch targets ``[B, S]`` / ``[B, S, K]``.

    Each branch is one fused single-branch loss (its co-training term is 0 by definition):
    ``correct`` holds each branch's hits and 0 for the ensemble, which has no images of its own
    here; ``ensemble`` is the mean of the branch logits, as the op defines it.
    """

    scores_ensemble = False

    def __init__(self, device: torch.device, *, kind: str = "js", temperature: float = 1.0,
                 backend: Optional[str] = None) -> None:
        self.kind, self.temperature, self.backend = kind, temperature, backend
        self._no_cotraining = torch.zeros((), dtype=torch.float32, device=device)

    def __call__(self, logits: Tensor, targets: Tensor, sample_weight: Optional[Tensor] = None) -> ops.CotrainLoss:
        if sample_weight is not None:
            raise ValueError("per-branch training (independent networks) takes no sample weights")
        S = logits.shape[1]
        if targets.shape[:2] != logits.shape[:2]:
            raise ValueError(f"independent training needs per-branch targets [B, S] or [B, S, K] for logits "
                             f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
        parts = [ops.cotrain_loss(logits[:, s:s + 1], targets[:, s].contiguous(), weight=self._no_cotraining,
                                  kind=self.kind, temperature=self.temperature, backend=self.backend)
                 for s in range(S)]
        correct = torch.cat([p.correct[:1] for p in parts] + [torch.zeros_like(parts[0].correct[:1])])
        return ops.CotrainLoss(loss=torch.stack([p.loss for p in parts]).sum(), ce=torch.cat([p.ce for p in parts]),
                               cot=torch.zeros_like(parts[0].cot), ensemble=logits.detach().mean(1),
                               correct=correct)
