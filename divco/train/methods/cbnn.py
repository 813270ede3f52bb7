"""cbnn: boosting by checkpoints, divco's reading of Wang et al. 2021 (SAMME applied to checkpoints).

ONE network (``--branches 1``); by default the recipe's warm-up + cosine restarts in every member
interval (``--cbnn-schedule restarts``; ``recipe``: one schedule over the run). After the epochs of
``checkpoint_epochs(E, M)`` the model in eval mode predicts the un-augmented training set,
:class:`divco.ensembles.boosting.BoostingState` gives the member's alpha and the new sample
weights (the rule of divco.ensembles.boosting.samme_update), and the loss weighs each image by
its sample weight from then on (mean 1 over the training set). The ensemble weights
(``--cbnn-member-weights``) are fitted on the validation split (divco.ensembles.heldout: the
weights that maximise its likelihood, refitted at every member) when the run has one, else the
alphas normalised to sum 1.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ...ensembles.boosting import (DEFAULT_SCHEDULE, ERROR_KINDS, MEMBER_WEIGHTINGS, SCHEDULES, BoostingState,
                                   checkpoint_epochs, checkpoint_errors, resolve_damping)
from ...ensembles.cyclic import RestartSchedule
from ...ensembles.heldout import heldout_weights, true_class_probabilities
from ..evaluation import predict
from ..runtime import option
from ..schedules import CyclicLR
from .checkpoint_ensemble import CheckpointEnsembleMethod


def member_weighting(config: Any) -> str:
    """validation when the run holds a validation split out (and nothing else was asked), else alpha."""
    if config.cbnn_member_weights is not None:
        return config.cbnn_member_weights
    return "validation" if config.val_split else "alpha"


def restart_schedule(plan) -> RestartSchedule:
    """The recipe's warm-up + cosine restarted at every member epoch."""
    config, recipe = plan.config, plan.recipe
    ends = tuple(epoch * plan.steps_per_epoch for epoch in checkpoint_epochs(config.epochs, config.members))
    return RestartSchedule(ends, recipe.lr, warmup=plan.warmup_steps, warmup_start_lr=recipe.warmup_start_lr,
                           min_lr=recipe.min_lr)


class Cbnn(CheckpointEnsembleMethod):
    name = "cbnn"
    summary = ("cbnn (boosting by checkpoints: M member checkpoints at equal intervals of the normal schedule, "
               "the training samples re-weighted at each as SAMME does, the weights' spread capped by "
               "--cbnn-weight-ratio, members weighted by alpha; --branches 1)")
    options = frozenset({"checkpoints", "cbnn_shrinkage", "cbnn_errors", "cbnn_weight_ratio", "cbnn_schedule",
                         "cbnn_member_weights"})

    def __init__(self) -> None:
        super().__init__()
        self.boosting: Optional[BoostingState] = None
        self.device: Optional[torch.device] = None
        self.loss_weights: Optional[Tensor] = None
        self.heldout: list[Tensor] = []  # [N_val] true-class probabilities of each member (validation weights)

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
        if config.cbnn_schedule is not None and config.cbnn_schedule not in SCHEDULES:
            raise ValueError(f"cbnn_schedule must be one of {SCHEDULES}, got {config.cbnn_schedule!r}")
        if config.cbnn_member_weights is not None and config.cbnn_member_weights not in MEMBER_WEIGHTINGS:
            raise ValueError(f"cbnn_member_weights must be one of {MEMBER_WEIGHTINGS}, got "
                             f"{config.cbnn_member_weights!r}")
        if config.cbnn_member_weights == "validation" and not config.val_split:
            raise ValueError(f"cbnn_member_weights 'validation' fits the members' weights on the validation split; "
                             f"this run holds none out ({option('val_split', config.val_split)}): give "
                             f"{option('val_split')} or use 'alpha'")

    def schedule_summary(self, plan) -> str:
        if (plan.config.cbnn_schedule or DEFAULT_SCHEDULE) == "recipe":
            return super().schedule_summary(plan)
        return f"lr warm-up {plan.recipe.warmup_epochs:g} epoch(s), cosine restarted at every member"

    def lr_schedule(self, optimizer, plan):
        if (plan.config.cbnn_schedule or DEFAULT_SCHEDULE) == "recipe":
            return super().lr_schedule(optimizer, plan)
        return CyclicLR(optimizer, restart_schedule(plan))

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
        weighting = {"alpha": result.alpha, "error": result.error}
        if member_weighting(run.config) == "validation":
            weighting["validation_weights"] = self._fit_validation_weights(run)
        self.take_member(run, epoch + 1, 0, (epoch + 1) * run.steps_per_epoch,
                         weighting=weighting, errors=errors, record=record)
        record["cbnn_alpha"], record["cbnn_error"] = result.alpha, result.error

    def _fit_validation_weights(self, run) -> list[float]:
        """This member's validation predictions joined to the earlier ones; the weights of all so far."""
        data = run.data
        logits = predict(self.model_to_evaluate(run), data.val_images.to(run.device), run.augmenter.normalize,
                         batch_size=run.config.eval_batch_size or max(run.config.batch_size, 256),
                         amp_dtype=run.amp_dtype, channels_last=run.channels_last)
        self.heldout.append(true_class_probabilities(logits[:, 0].cpu(), data.val_labels.cpu()))
        return heldout_weights(torch.stack(self.heldout, 1))

    def describe(self, plan, printed: dict) -> None:
        if (plan.config.cbnn_schedule or DEFAULT_SCHEDULE) == "restarts":
            rates = restart_schedule(plan)
            printed["lr_schedule"] = {**printed["lr_schedule"], "type": "linear warm-up then cosine, restarted "
                                      "(no warm-up) after every member", "interval_ends": list(rates.ends)}
        super().describe(plan, printed)

    def member_plan(self, plan) -> dict:
        config = plan.config
        shrinkage, max_weight_ratio = resolve_damping(config.cbnn_shrinkage, config.cbnn_weight_ratio)
        return {**super().member_plan(plan), "member_epochs": checkpoint_epochs(config.epochs, config.members),
                "weights": ("fitted on the validation split (maximum likelihood of the weighted mean of "
                            "probabilities)" if member_weighting(config) == "validation" else "alpha_j normalised"),
                "schedule": config.cbnn_schedule or DEFAULT_SCHEDULE,
                "shrinkage": shrinkage, "errors": config.cbnn_errors or "zero_one",
                "max_weight_ratio": max_weight_ratio}

    def extra_state(self) -> dict:
        return self.boosting.to_dict()

    def state_dict(self, run) -> dict:
        return {**super().state_dict(run), "heldout": [p.clone() for p in self.heldout]}

    def load_state_dict(self, run, state: Optional[dict]) -> None:
        super().load_state_dict(run, state)
        self.heldout = [p.clone() for p in state.get("heldout", [])]

    def load_extra_state(self, state: Optional[dict]) -> None:
        self.boosting = BoostingState.from_dict(state)
        self._refresh_loss_weights()
