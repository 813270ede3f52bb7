"""TrainStep: one optimisation step of divide-and-co-training, with no host synchronisation.

    step = TrainStep(model, optimizer, cot_weight=torch.tensor(0.5))
    for images, targets in batches:           # images [B, S, 3, H, W], targets [B] or [B, K]
        step(images, targets)
    epoch = step.metrics.read()                # the one host read of the epoch

The step reads nothing back from the device: the loss, per-branch cross-entropies,
co-training term and top-1 hit counts are summed into device tensors
(:class:`RunningMetrics`) and read once per epoch.  So are the steps whose loss was
not finite: with ``on_nonfinite="stop"`` (the default) they are applied and counted
(the caller stops the run at the end of the epoch); with ``"skip-step"`` a step whose
loss or gradients are not finite leaves the weights, the BatchNorm statistics and the
optimiser state as they were (a device-side select, still no host sync) and only its
count enters the metrics.
The co-training weight is a 0-dim device tensor updated in place, so a warm-up
schedule never retraces a compiled step.  What the step minimises is its objective
(divco.train.objectives), chosen by the training method: the step knows no method.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..vocabulary import NONFINITE_POLICIES
from .capture import check_capture, whole_step_capture
from .objectives import CotrainingObjective, Objective
from .runtime import unwrap_model  # noqa: F401  (re-exported: divco.train.step.unwrap_model)


class RunningMetrics:
    """Sums of the step outputs over an epoch, kept on the device until :meth:`read`."""

    def __init__(self, branches: int, device: torch.device, *, ensemble: bool = True) -> None:
        self.branches = branches
        self.device = torch.device(device)
        self.ensemble = ensemble  # False when the branches see different images (no ensemble to score)
        self.reset()

    def reset(self) -> None:
        if hasattr(self, "sums"):  # zeroed in place: a captured step writes into these very tensors
            for t in (self.sums, self.correct, self.nonfinite, self.steps):
                t.zero_()
            self.count = 0
            return
        # float64 sums: thousands of float32 batch means add up without visible rounding.
        self.sums = torch.zeros(self.branches + 2, dtype=torch.float64, device=self.device)  # loss, ce[S], cot
        self.correct = torch.zeros(self.branches + 1, dtype=torch.int64, device=self.device)
        # non-finite steps, the first of them (1-based step of the epoch, 0: none), images of skipped steps
        self.nonfinite = torch.zeros(3, dtype=torch.int64, device=self.device)
        self.count = 0  # images: a host number, known without asking the device
        # steps added, on the device: a Python counter would be baked into a captured step as a constant
        self.steps = torch.zeros((), dtype=torch.int64, device=self.device)

    def add(self, out: ops.CotrainLoss, batch_size: int, *, bad: Optional[Tensor] = None,
            skipped: bool = False) -> None:
        """Add a step's outputs; ``bad`` (0-dim bool) marks a non-finite step, left out of the sums if ``skipped``."""
        self.accumulate(out, batch_size, bad=bad, skipped=skipped)
        self.count_images(batch_size)

    def count_images(self, batch_size: int) -> None:
        """The host half of :meth:`add`: a captured step replays :meth:`accumulate` only."""
        self.count += batch_size

    def accumulate(self, out: ops.CotrainLoss, batch_size: int, *, bad: Optional[Tensor] = None,
                   skipped: bool = False) -> None:
        """The device half of :meth:`add` (no host state: safe inside torch.compile and CUDA graphs)."""
        self.steps.add_(1)
        packed = torch.cat([out.loss.detach().reshape(1), out.ce, out.cot.reshape(1)]).to(torch.float64)
        correct = out.correct
        if bad is None:
            bad = ~torch.isfinite(out.loss.detach())
        if skipped:
            packed = torch.where(bad, 0.0, packed)
            correct = torch.where(bad, 0, correct)
        self.sums.add_(packed, alpha=batch_size)
        self.correct.add_(correct)
        first = torch.where(self.nonfinite[1] == 0, self.steps, self.nonfinite[1])
        self.nonfinite.add_(torch.stack([bad.long(), (first - self.nonfinite[1]) * bad,
                                         bad.long() * batch_size * int(skipped)]))

    def read(self, process_group=None) -> dict:
        """Means over the images seen (summed over processes when distributed); syncs once."""
        nonfinite = self.nonfinite.clone()
        if process_group is not None:  # first non-finite step: the earliest of any process
            nonfinite[1] = torch.where(nonfinite[1] == 0, torch.iinfo(torch.int64).max, nonfinite[1])
        packed = torch.cat([self.sums, self.correct.to(torch.float64),
                            torch.tensor([float(self.count)], dtype=torch.float64, device=self.device),
                            nonfinite[[0, 2]].to(torch.float64)])
        if process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(packed, group=process_group)
            dist.all_reduce(nonfinite[1:2], op=dist.ReduceOp.MIN, group=process_group)
        values = packed.cpu().tolist()
        first = int(nonfinite[1])
        S = self.branches
        count = values[-3]
        if count == 0:
            raise ValueError("no training images were seen this epoch")
        sums, correct = values[: S + 2], values[S + 2: 2 * S + 3]
        used = count - values[-1]  # images of applied steps (all of them unless steps were skipped)
        mean = (lambda v: v / used) if used else (lambda v: float("nan"))
        return {
            "train_loss": mean(sums[0]),
            "train_ce": [mean(v) for v in sums[1: S + 1]],
            "train_cot": mean(sums[S + 1]),
            "train_branch_acc": [mean(v) for v in correct[:S]],
            "train_ensemble_acc": mean(correct[S]) if self.ensemble else None,
            "train_images": int(count),
            "train_nonfinite_steps": int(values[-2]),
            "train_first_nonfinite_step": first if 0 < first < torch.iinfo(torch.int64).max else None,
        }

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "correct": self.correct.cpu(), "count": self.count,
                "nonfinite": self.nonfinite.cpu(), "steps": int(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.correct.copy_(state["correct"])
        self.count = int(state["count"])
        self.nonfinite.copy_(state["nonfinite"])
        self.steps.fill_(int(state["steps"]))


class TrainStep:
    """forward -> co-training loss -> backward -> optimiser step (-> scheduler step).

    Args:
        model: a BranchBatchedNetwork (or a DDP / compiled wrapper of one) returning
            logits ``[B, S, K]``.
        optimizer: any torch optimizer.
        cot_weight: the co-training weight, a 0-dim float32 tensor on the model's device
            (update it in place: ``cot_weight.fill_(w)``).
        cot_kind, temperature, backend: of the default objective, :class:`CotrainingObjective`
            (passed to :func:`divco.ops.cotrain_loss`).
        scheduler: optional; ``scheduler.step()`` after every optimiser step.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for full precision.
        scaler: a ``torch.amp.GradScaler`` for float16 (it reads its overflow flag on the
            host: the one synchronisation float16 training needs).
        compile: wrap forward + loss in ``torch.compile`` (the same as ``capture="compile"``).
        capture: how the step is captured (:data:`divco.train.capture.CAPTURE_MODES`): ``"none"``,
            ``"compile"`` (forward + loss compiled), ``"compile-step"`` (forward, loss, backward
            and optimiser step in one compiled graph) or ``"cuda-graph"`` (the whole step
            replayed as one CUDA graph); see :mod:`divco.train.capture`.
        objective: the loss of the logits (divco.train.objectives), instead of the co-training one
            that ``cot_weight``, ``cot_kind``, ``temperature`` and ``backend`` describe; e.g.
            :class:`~divco.train.objectives.PerBranchObjective` (each branch its own targets).
        Calling the step with ``sample_weight`` [B] (``--method cbnn``) weighs each image's loss
        (the objective, the one place the weights enter).
        on_nonfinite: ``"stop"`` (apply and count non-finite steps; the caller stops) or
            ``"skip-step"`` (do not apply them: weights and optimiser state are restored
            on the device from a copy taken before the step; counted in the metrics).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, cot_weight: Tensor,
                 branches: Optional[int] = None, cot_kind: str = "js", temperature: float = 1.0,
                 backend: Optional[str] = None, scheduler=None, amp_dtype: Optional[torch.dtype] = None,
                 scaler=None, compile: bool = False, on_nonfinite: str = "stop", capture: str = "none",
                 objective: Optional[Objective] = None) -> None:
        if not isinstance(cot_weight, Tensor) or cot_weight.dim() != 0:
            raise ValueError(f"cot_weight must be a 0-dim tensor, got {cot_weight!r}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if objective is not None and (cot_kind, temperature, backend) != ("js", 1.0, None):
            raise ValueError(f"cot_kind, temperature and backend describe the default objective; with "
                             f"objective={type(objective).__name__}(...) pass them to it, got cot_kind={cot_kind!r}, "
                             f"temperature={temperature!r}, backend={backend!r}")
        self.skip_nonfinite = on_nonfinite == "skip-step"
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cot_weight = cot_weight
        self.objective = objective or CotrainingObjective(cot_weight, kind=cot_kind, temperature=temperature,
                                                          backend=backend)
        self.amp_dtype = amp_dtype
        self.autocast_cache = True
        self.scaler = scaler
        device = cot_weight.device
        self.device_type = device.type
        if branches is None:
            branches = unwrap_model(model).branches
        self.metrics = RunningMetrics(branches, device, ensemble=self.objective.scores_ensemble)
        self._forward_loss: Callable[..., ops.CotrainLoss] = self.forward_loss
        capture = check_capture(capture, compile)
        if capture == "compile":
            self._forward_loss = torch.compile(self.forward_loss)
        # compile-step / cuda-graph: the whole step runs through this object (None: eager)
        self._captured = whole_step_capture(self, capture)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # the cast cache must be off while a CUDA graph is captured (cached casts would be graph-private memory)
        return torch.autocast(self.device_type, dtype=self.amp_dtype, cache_enabled=self.autocast_cache)

    def forward_loss(self, images: Tensor, targets: Tensor, sample_weight: Optional[Tensor] = None) -> ops.CotrainLoss:
        with self.autocast():
            logits = self.model(images)
        return self.loss(logits, targets, sample_weight)

    def loss(self, logits: Tensor, targets: Tensor, sample_weight: Optional[Tensor] = None) -> ops.CotrainLoss:
        """The objective's loss of a batch's logits (``sample_weight`` [B]: cbnn's per-image weights)."""
        return self.objective(logits, targets, sample_weight)

    def __call__(self, images: Tensor, targets: Tensor, sample_weight: Optional[Tensor] = None) -> ops.CotrainLoss:
        if self._captured is not None:
            return self._captured(images, targets, sample_weight)
        out, bad = self.update(images, targets, sample_weight)
        if self.scheduler is not None:
            self.scheduler.step()
        self.metrics.add(out, images.shape[0], bad=bad, skipped=bad is not None)
        return out

    def update(self, images: Tensor, targets: Tensor, sample_weight: Optional[Tensor] = None, *,
               optimizer_step: Optional[Callable[[], None]] = None) -> tuple[ops.CotrainLoss, Optional[Tensor]]:
        """Forward, loss, backward, optimiser step (``optimizer_step``, default ``optimizer.step``): the
        eager step without the scheduler and metrics; returns the loss outputs and the non-finite flag
        (None unless skip-step)."""
        optimizer_step = optimizer_step or self.optimizer.step
        # skip-step also undoes the forward pass's BatchNorm statistics: copy them before it
        buffers = list(unwrap_model(self.model).buffers()) if self.skip_nonfinite else []
        buffers_before = [b.clone() for b in buffers]
        out = self._forward_loss(images, targets, sample_weight)
        self.optimizer.zero_grad(set_to_none=True)
        bad = None
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.optimizer)  # skips the optimiser step itself when a gradient is not finite
            self.scaler.update()
            if self.skip_nonfinite:
                bad = ~torch.isfinite(out.loss.detach())
                with torch.no_grad():
                    for now, then in zip(buffers, buffers_before):
                        now.copy_(torch.where(bad, then, now))
        else:
            out.loss.backward()
            if self.skip_nonfinite:
                bad = self._step_unless_nonfinite(out.loss, list(zip(buffers, buffers_before)), optimizer_step)
            else:
                optimizer_step()
        return out, bad

    def _step_unless_nonfinite(self, loss: Tensor, restore: list[tuple[Tensor, Tensor]],
                               optimizer_step: Optional[Callable[[], None]] = None) -> Tensor:
        """Step, then put back weights, optimiser state and ``restore`` if the loss or a gradient is not finite.

        The select happens on the device (``torch.where``): no host sync.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        bad = ~torch.isfinite(loss.detach())
        if grads:
            bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        if isinstance(self.optimizer, torch.optim.SGD):  # make the state exist before the copy: SGD creates its
            for group in self.optimizer.param_groups:     # momentum buffers in the first step, and a zero buffer
                if group["momentum"] and not group["dampening"]:  # steps exactly as a missing one (dampening 0)
                    for p in group["params"]:
                        self.optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        state = [t for p in params for t in [p.data, *self.optimizer.state[p].values()] if isinstance(t, Tensor)]
        restore = restore + [(t, t.clone()) for t in state]
        (optimizer_step or self.optimizer.step)()
        with torch.no_grad():
            for now, then in restore:
                now.copy_(torch.where(bad, then, now))
        return bad
