"""independent: S independent networks in one launch (Kondratyuk et al. 2020).

No co-training term (its weight is 0 and never read), and each branch its own order of the
training set: branch s sees the order a separate run with seed + s would see, augmented (and
mixed up) on its own. The step minimises Σ_s CE_s against per-branch targets
(divco.train.objectives.PerBranchObjective).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..objectives import PerBranchObjective
from ..runtime import branch_epoch_orders, process_shard
from .base import TrainingMethod


#: The co-training options and their defaults: an independent run refuses any other value (it has no such term).
_COTRAIN_DEFAULTS = {"cot_weight": 0.5, "cot_warmup_epochs": None}


class Independent(TrainingMethod):
    name = "independent"
    summary = ("independent (S independent networks in one launch: no co-training term, so --cot-weight is not "
               "used, and each branch its own order of the training set, branch s the order a separate run with "
               "seed + s would see)")

    def objective(self, plan, cot_weight: Tensor) -> PerBranchObjective:
        config = plan.config
        return PerBranchObjective(cot_weight.device, kind=config.cot_kind, temperature=config.temperature,
                                  backend=config.backend)

    @classmethod
    def check_options(cls, config) -> None:
        from ..runtime import option

        unused = [name for name, default in _COTRAIN_DEFAULTS.items() if getattr(config, name) != default]
        if unused:
            raise ValueError(f"{', '.join(option(n, getattr(config, n)) for n in unused)}: method 'independent' "
                             f"trains without the co-training term, so it does not use "
                             f"{'this option' if len(unused) == 1 else 'these options'}; drop "
                             f"{'it' if len(unused) == 1 else 'them'} or use --method cotrain")

    def cot_weight(self, plan, epoch: int) -> float:
        return 0.0

    def cotrain_summary(self, plan) -> str:
        return "no co-training (independent networks)"

    def epoch_order(self, plan, epoch: int, rank: int, world_size: int) -> Tensor:
        """``[S, steps * batch]``: every branch its own order of the training set."""
        orders = branch_epoch_orders(plan.train_images, plan.config.seed, epoch, plan.config.branches)
        return torch.stack([process_shard(o, rank, world_size)[: plan.steps_per_epoch * plan.batch] for o in orders])

    def batch(self, run, images: Tensor, labels: Tensor, order: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """Views ``[B, S, 3, H, W]`` and targets ``[B, S]`` / ``[B, S, K]``: branch s gets the images of its
        own order, augmented (and mixed up) on their own, as a separate run would."""
        K = run.data.num_classes
        per_branch = [run.augmenter.training_batch(images.index_select(0, rows), labels.index_select(0, rows), 1, K)
                      for rows in self.batch_index(run, order, step)]
        return torch.cat([v for v, _ in per_branch], dim=1), torch.stack([t for _, t in per_branch], dim=1), {}
