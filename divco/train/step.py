"""TrainStep: one optimisation step of divide-and-co-training, with no host synchronisation.

    step = TrainStep(model, optimizer, cot_weight=torch.tensor(0.5))
    for images, targets in batches:           # images [B, S, 3, H, W], targets [B] or [B, K]
        step(images, targets)
    epoch = step.metrics.read()                # the one host read of the epoch

The step reads nothing back from the device: the loss, per-branch cross-entropies,
co-training term and top-1 hit counts are summed into device tensors
(:class:`RunningMetrics`) and read once per epoch.  The co-training weight is a 0-dim
device tensor updated in place, so a warm-up schedule never retraces a compiled step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import ops


class RunningMetrics:
    """Sums of the step outputs over an epoch, kept on the device until :meth:`read`."""

    def __init__(self, branches: int, device: torch.device) -> None:
        self.branches = branches
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        # float64 sums: thousands of float32 batch means add up without visible rounding.
        self.sums = torch.zeros(self.branches + 2, dtype=torch.float64, device=self.device)  # loss, ce[S], cot
        self.correct = torch.zeros(self.branches + 1, dtype=torch.int64, device=self.device)
        self.count = 0  # images: a host number, known without asking the device

    def add(self, out: ops.CotrainLoss, batch_size: int) -> None:
        packed = torch.cat([out.loss.detach().reshape(1), out.ce, out.cot.reshape(1)]).to(torch.float64)
        self.sums.add_(packed, alpha=batch_size)
        self.correct.add_(out.correct)
        self.count += batch_size

    def read(self, process_group=None) -> dict:
        """Means over the images seen (summed over processes when distributed); syncs once."""
        packed = torch.cat([self.sums, self.correct.to(torch.float64),
                            torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)])
        if process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(packed, group=process_group)
        values = packed.cpu().tolist()
        S = self.branches
        count = values[-1]
        if count == 0:
            raise ValueError("no training images were seen this epoch")
        sums, correct = values[: S + 2], values[S + 2: 2 * S + 3]
        return {
            "train_loss": sums[0] / count,
            "train_ce": [v / count for v in sums[1: S + 1]],
            "train_cot": sums[S + 1] / count,
            "train_branch_acc": [v / count for v in correct[:S]],
            "train_ensemble_acc": correct[S] / count,
            "train_images": int(count),
        }

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "correct": self.correct.cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.correct.copy_(state["correct"])
        self.count = int(state["count"])


class TrainStep:
    """forward -> co-training loss -> backward -> optimiser step (-> scheduler step).

    Args:
        model: a BranchBatchedNetwork (or a DDP / compiled wrapper of one) returning
            logits ``[B, S, K]``.
        optimizer: any torch optimizer.
        cot_weight: the co-training weight, a 0-dim float32 tensor on the model's device
            (update it in place: ``cot_weight.fill_(w)``).
        cot_kind, temperature, backend: passed to :func:`divco.ops.cotrain_loss`.
        scheduler: optional; ``scheduler.step()`` after every optimiser step.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for full precision.
        scaler: a ``torch.amp.GradScaler`` for float16 (it reads its overflow flag on the
            host: the one synchronisation float16 training needs).
        compile: wrap forward + loss in ``torch.compile``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, cot_weight: Tensor,
                 branches: Optional[int] = None, cot_kind: str = "js", temperature: float = 1.0,
                 backend: Optional[str] = None, scheduler=None, amp_dtype: Optional[torch.dtype] = None,
                 scaler=None, compile: bool = False) -> None:
        if not isinstance(cot_weight, Tensor) or cot_weight.dim() != 0:
            raise ValueError(f"cot_weight must be a 0-dim tensor, got {cot_weight!r}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cot_weight = cot_weight
        self.cot_kind = cot_kind
        self.temperature = temperature
        self.backend = backend
        self.amp_dtype = amp_dtype
        self.scaler = scaler
        device = cot_weight.device
        self.device_type = device.type
        if branches is None:
            branches = unwrap_model(model).branches
        self.metrics = RunningMetrics(branches, device)
        self._forward_loss: Callable[[Tensor, Tensor], ops.CotrainLoss] = self.forward_loss
        if compile:
            self._forward_loss = torch.compile(self.forward_loss)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def forward_loss(self, images: Tensor, targets: Tensor) -> ops.CotrainLoss:
        with self.autocast():
            logits = self.model(images)
        return ops.cotrain_loss(logits, targets, weight=self.cot_weight, kind=self.cot_kind,
                                temperature=self.temperature, backend=self.backend)

    def __call__(self, images: Tensor, targets: Tensor) -> ops.CotrainLoss:
        out = self._forward_loss(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            out.loss.backward()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.metrics.add(out, images.shape[0])
        return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The BranchBatchedNetwork inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model
