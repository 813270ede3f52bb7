"""TrainingMethod: what makes one training method (``--method``) differ from another.

The engine (divco.train.engine) runs one loop for every method and asks the run's method,
a fresh object per run, at each point where methods differ. Every hook has the behaviour of
plain divide-and-co-training here, so a method overrides only what it changes.

Configuration and plan
    ``options``            the method-only TrainConfig fields it accepts (any other method refuses them)
    ``validate(config)``   raise ValueError for a config this method cannot run (a clear one-line message)
    ``check_options(config)``  raise ValueError for an option the method does not use (asked by
                           divco.train.run_checks, so a run and ``--print-config`` refuse it alike)
    ``single_process``     why it refuses torchrun launches (its state is not sharded), or "" (it runs anywhere)
    ``check_launch(world_size)``  raise ValueError for a launch of ``world_size`` processes it cannot run
                           (by default: any above 1 when ``single_process`` says why); asked before
                           any process group is set up
    ``checkpoint_ensemble`` True: its ensemble is made of member checkpoints (members.json in the run)
    ``member_count(config)``  M, the member checkpoints of a run (swa: always 1, the average)
    ``schedule_summary(plan)``  the lr-schedule words of the run's first status line
    ``describe(plan, printed)`` edit the ``--print-config`` dict (its ``lr_schedule``, ``cotrain``, extra keys)

Assembly (once per run)
    ``build_model(build)``       the network to train; ``build()`` makes the configured one (a
                                 branch-parallel method builds only this process's branches here)
    ``lr_schedule(optimizer, plan)``  the StepSchedule (divco.train.schedules) of the run
    ``objective(plan, cot_weight)``  what the step minimises (divco.train.objectives): default the
                                 co-training loss; independent networks: each branch its own CE
    ``start(run)``               create the method's state (members, sample weights, averaged weights)

Every epoch and step
    ``cot_weight(plan, epoch)``  the co-training weight of an epoch
    ``epoch_order(plan, epoch, rank, world_size)``  this process's image order: ``[steps * batch]``
                                 (one order) or ``[S, steps * batch]`` (one per branch)
    ``batch(run, images, labels, order, step)``  (views ``[B, S, 3, H, W]``, targets, TrainStep
                                 keywords such as ``sample_weight``) of step ``step``
    ``after_step(run, epoch, step, iteration)``   after every optimiser step (1-based ``iteration``
                                 over the run): take a mid-epoch member, update averaged weights
    ``after_epoch(run, epoch, record, train_images, train_labels)``  after an epoch's evaluation,
                                 before its checkpoint: take a member, add fields to ``record``
    ``end_training(run)``        once, after the last epoch's steps, before its evaluation (e.g.
                                 recompute the BN statistics of averaged weights)
    ``model_to_evaluate(run)``   the model that is evaluated every epoch (and predicts cbnn's training
                                 set): default the trained network; an averaging method returns its average
                                 (the checkpoint's "model" stays the trained one, so a resume continues it;
                                 such a method keeps its average in ``state_dict``)
    ``gather_logits(run, logits)``  the full ``[N, S, K]`` logits from this process's (default: all)

State (resume to the bit)
    ``state_dict(run)`` / ``load_state_dict(run, state)``  the checkpoint's ``checkpoint_ensemble``
                                 entry (None: nothing beyond the model and the optimiser)

How the next methods fit: fge (Garipov et al. 2018) overrides ``lr_schedule`` (pre-training
phase, then cycles) and takes a member per cycle in ``after_step`` like snapshot; swa (Izmailov
et al. 2018) keeps ``torch.optim.swa_utils.AveragedModel`` from ``start``, updates it in
``after_epoch``, recomputes the BN statistics in ``end_training`` and returns it from
``model_to_evaluate``; a branch-parallel method builds its processes' branches in
``build_model`` and all-gathers them in ``gather_logits``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from ..objectives import CotrainingObjective, Objective
from ..runtime import epoch_order, process_shard
from ..schedules import StepSchedule, WarmupCosineSchedule, cot_weight_for_epoch
from ..step import unwrap_model

if TYPE_CHECKING:
    from ..assembly import Run
    from ..plan import RunPlan


#: M, the member checkpoints of a snapshot, cbnn or fge run, when ``checkpoints`` is not given.
DEFAULT_CHECKPOINTS = 3


class TrainingMethod:
    """Plain divide-and-co-training; subclasses override the hooks their method changes."""

    #: The ``--method`` name (the registry key, divco.train.methods).
    name: ClassVar[str] = ""
    #: One sentence for ``--method``'s help.
    summary: ClassVar[str] = ""
    options: ClassVar[frozenset[str]] = frozenset()
    single_process: ClassVar[str] = ""
    checkpoint_ensemble: ClassVar[bool] = False

    # -- configuration and plan -----------------------------------------------------------------
    @classmethod
    def member_count(cls, config: Any) -> int:
        """M, the member checkpoints of a run of this method (``checkpoints`` or its default)."""
        return config.checkpoints if config.checkpoints is not None else DEFAULT_CHECKPOINTS

    def validate(self, config: Any) -> None:
        """Raise ValueError when ``config`` does not fit this method."""

    @classmethod
    def check_options(cls, config: Any) -> None:
        """Raise ValueError naming an option that this method does not use (default: it uses them all)."""

    @classmethod
    def check_launch(cls, world_size: int) -> None:
        """Raise ValueError unless this method runs on ``world_size`` processes."""
        if cls.single_process and world_size > 1:
            raise ValueError(f"method {cls.name!r} runs on one process ({cls.single_process}); this launch has "
                             f"WORLD_SIZE={world_size}: run it without torchrun")

    def schedule_summary(self, plan: "RunPlan") -> str:
        return f"lr warm-up {plan.recipe.warmup_epochs:g} epoch(s)"

    def cotrain_summary(self, plan: "RunPlan") -> str:
        """The start line's word on the co-training term (one network has none)."""
        if plan.config.branches == 1:
            return "no co-training (one network)"
        return f"co-training warm-up {plan.recipe.cot_warmup_epochs} epoch(s)"

    def describe(self, plan: "RunPlan", printed: dict) -> None:
        """Edit ``printed``, the ``--print-config`` dict of the run (JSON-ready values)."""

    # -- assembly ---------------------------------------------------------------------------------
    def build_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        return build()

    def lr_schedule(self, optimizer: torch.optim.Optimizer, plan: "RunPlan") -> StepSchedule:
        """The recipe's schedule: linear warm-up, then cosine decay with a floor."""
        return WarmupCosineSchedule(optimizer, base_lr=plan.recipe.lr, total_steps=plan.total_steps,
                                    warmup_steps=plan.warmup_steps, warmup_start_lr=plan.recipe.warmup_start_lr,
                                    min_lr=plan.recipe.min_lr)

    def objective(self, plan: "RunPlan", cot_weight: Tensor) -> Objective:
        """Σ_s CE_s + weight · J, the co-training loss; ``cot_weight`` is the run's in-place weight tensor."""
        config = plan.config
        return CotrainingObjective(cot_weight, kind=config.cot_kind, temperature=config.temperature,
                                   backend=config.backend)

    def start(self, run: "Run") -> None:
        """Create the method's state; called once, after the run is assembled, before any resume."""

    # -- every epoch and step ---------------------------------------------------------------------
    def cot_weight(self, plan: "RunPlan", epoch: int) -> float:
        """The official per-epoch warm-up of the co-training weight."""
        return cot_weight_for_epoch(epoch, plan.config.cot_weight, plan.recipe.cot_warmup_epochs)

    def epoch_order(self, plan: "RunPlan", epoch: int, rank: int, world_size: int) -> Tensor:
        """One image order for every branch: a pure function of (seed, epoch), this process's shard."""
        order = epoch_order(plan.train_images, plan.config.seed, epoch)
        return process_shard(order, rank, world_size)[: plan.steps_per_epoch * plan.batch]

    def batch(self, run: "Run", images: Tensor, labels: Tensor, order: Tensor, step: int
              ) -> tuple[Tensor, Tensor, dict]:
        """S augmented views of the step's images (one view per branch) and their targets."""
        index = self.batch_index(run, order, step)
        views, targets = run.augmenter.training_batch(images.index_select(0, index), labels.index_select(0, index),
                                                      run.config.branches, run.data.num_classes)
        return views, targets, {}

    @staticmethod
    def batch_index(run: "Run", order: Tensor, step: int) -> Tensor:
        return order[..., step * run.batch:(step + 1) * run.batch]

    def after_step(self, run: "Run", epoch: int, step: int, iteration: int) -> None:
        """After optimiser step ``step`` (0-based in ``epoch``; ``iteration`` 1-based over the run)."""

    def after_epoch(self, run: "Run", epoch: int, record: dict, train_images: Tensor, train_labels: Tensor) -> None:
        """After the evaluation of ``epoch`` (0-based), before its checkpoint; may add to ``record``."""

    def end_training(self, run: "Run") -> None:
        """Once, after the last epoch's steps and before its evaluation (and checkpoint)."""

    def model_to_evaluate(self, run: "Run") -> nn.Module:
        return unwrap_model(run.net)

    def gather_logits(self, run: "Run", logits: Tensor) -> Tensor:
        return logits

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self, run: "Run") -> Optional[dict]:
        return None

    def load_state_dict(self, run: "Run", state: Optional[dict]) -> None:
        """Restore :meth:`state_dict`'s value (called when a run resumes)."""
