"""cbnn: boosting by checkpoints, divco's reading of Wang et al. 2021 (SAMME applied to checkpoints).

ONE network (``--branches 1``) on the recipe's schedule; after the epochs of
``checkpoint_epochs(E, M)`` the model in eval mode predicts the un-augmented training set,
:class:`divco.ensembles.boosting.BoostingState` gives the member's alpha and the new sample
weights (the rule of divco.ensembles.boosting.samme_update), and the loss weighs each image by
its sample weight from then on (mean 1 over the training set). The ensemble weights are the
alphas normalised to sum 1.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ...ensembles.boosting import ERROR_KINDS, BoostingState, checkpoint_epochs, checkpoint_errors, resolve_damping
from ..evaluation import predict
from .checkpoint_ensemble import CheckpointEnsembleMethod


class Cbnn(CheckpointEnsembleMethod):
    name = "cbnn"
    summary = ("cbnn (boosting by checkpoints: M member checkpoints at equal intervals of the normal schedule, "
               "the training samples re-weighted at each as SAMME does, the weights' spread capped by "
               "--cbnn-weight-ratio, members weighted by alpha; --branches 1)")
    options = frozenset({"checkpoints", "cbnn_shrinkage", "cbnn_errors", "cbnn_weight_ratio"})

    def __init__(self) -> None:
        super().__init__()
        self.boosting: Optional[BoostingState] = None
        self.device: Optional[torch.device] = None
        self.loss_weights: Optional[Tensor] = None

    def validate(self, config: Any) -> None:
        super().validate(config)
        shrinkage = config.cbnn_shrinkage
        if shrinkage is not None and not (isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool)
                                          and 0 < shrinkage < float("inf")):
            raise ValueError(f"cbnn_shrinkage must be a finite number > 0.0, got {shrinkage!r}")
        if config.cbnn_errors is not None and config.cbnn_errors not in ERROR_KINDS:
            raise ValueError(f"cbnn_errors must be one of {ERROR_KINDS}, got {config.cbnn_errors!r}")
        ratio = config.cbnn_weight_ratio
        if ratio is not None and ratio != 0:
            try:
                resolve_damping(None, ratio)
            except ValueError:
                raise ValueError(f"cbnn_weight_ratio must be a finite number >= 1 (R), or 0 (no cap: plain SAMME), "
                                 f"got {ratio!r}") from None

    def start(self, run) -> None:
        super().start(run)
        config = run.config
        self.device = run.device
        shrinkage, max_weight_ratio = resolve_damping(config.cbnn_shrinkage, config.cbnn_weight_ratio)
        self.boosting = BoostingState(run.plan.train_images, run.data.num_classes, config.epochs, config.members,
                                      shrinkage=shrinkage, error_kind=config.cbnn_errors or "zero_one",
                                      max_weight_ratio=max_weight_ratio)
        self._refresh_loss_weights()

    def _refresh_loss_weights(self) -> None:
        self.loss_weights = self.boosting.loss_weights().to(device=self.device, dtype=torch.float32)

    def batch(self, run, images: Tensor, labels: Tensor, order: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """The normal batch, its loss weighed per image by the sample weights."""
        views, targets, _ = super().batch(run, images, labels, order, step)
        return views, targets, {"sample_weight": self.loss_weights.index_select(0, self.batch_index(run, order, step))}

    def after_epoch(self, run, epoch: int, record: dict, train_images: Tensor, train_labels: Tensor) -> None:
        """At a member's epoch: the boosting round (alpha, new sample weights), then the member."""
        if not self.boosting.is_checkpoint_epoch(epoch + 1):
            return
        logits = predict(self.model_to_evaluate(run), train_images, run.augmenter.normalize,
                         batch_size=run.config.eval_batch_size or max(run.config.batch_size, 256),
                         amp_dtype=run.amp_dtype, channels_last=run.channels_last)
        errors = checkpoint_errors(logits, train_labels, self.boosting.error_kind).cpu()
        result = self.boosting.record(errors)
        self._refresh_loss_weights()
        run.report(f"cbnn member {len(self.members.taken) + 1}/{self.members.count}: weighted training error "
                   f"{result.error:.4f}, alpha {result.alpha:.4f}")
        self.take_member(run, epoch + 1, 0, (epoch + 1) * run.steps_per_epoch,
                         weighting={"alpha": result.alpha, "error": result.error}, errors=errors, record=record)
        record["cbnn_alpha"], record["cbnn_error"] = result.alpha, result.error

    def member_plan(self, plan) -> dict:
        config = plan.config
        shrinkage, max_weight_ratio = resolve_damping(config.cbnn_shrinkage, config.cbnn_weight_ratio)
        return {**super().member_plan(plan), "member_epochs": checkpoint_epochs(config.epochs, config.members),
                "weights": "alpha_j normalised", "shrinkage": shrinkage, "errors": config.cbnn_errors or "zero_one",
                "max_weight_ratio": max_weight_ratio}

    def extra_state(self) -> dict:
        return self.boosting.to_dict()

    def load_extra_state(self, state: Optional[dict]) -> None:
        self.boosting = BoostingState.from_dict(state)
        self._refresh_loss_weights()
