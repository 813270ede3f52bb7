"""The paper's training recipe, as the official code sets it (parser_params.py, lr_scheduler.py).

* SGD, momentum 0.9, Nesterov; learning rate 0.1 per 128 images (linear scaling).
* Learning rate per iteration: linear warm-up from 5e-3 over the first 20 of 300 epochs,
  then cosine decay to the end, never below 1e-4.
* Weight decay by architecture: 5e-4 for the large CIFAR networks (WRN-16-12, WRN-28-10,
  WRN-40-10, WRN-52-8, ResNeXt-29), 1e-4 otherwise (WRN-16-8, ResNet-110/164,
  SE-ResNets, PyramidNet, ImageNet ResNets); for S > 1 multiplied by exp(1/S - 1);
  never applied to normalisation parameters or biases.
* Co-training weight 0.5 (Jensen-Shannon), warmed up per epoch as
  max(0.5 * epoch / 40, 0.005) over the first 40 of 300 epochs.

Shorter runs scale the warm-ups with the schedule (20/300 and 40/300 of the run).
"""

from __future__ import annotations

import math
from typing import Iterable

from torch import nn

REFERENCE_EPOCHS = 300
LR_WARMUP_EPOCHS = 20
COT_WARMUP_EPOCHS = 40
LR_PER_128_IMAGES = 0.1
COT_WEIGHT_FLOOR = 0.005

#: The official code's CIFAR weight decay of 5e-4 ("a larger weight decay for large model").
LARGE_WEIGHT_DECAY_MODELS = frozenset({
    "wide_resnet16_12", "wide_resnet28_10", "wide_resnet40_10", "wide_resnet52_8",
    "resnext29_8x64d", "resnext29_16x64d",
})


def default_lr(batch_size: int) -> float:
    return LR_PER_128_IMAGES * batch_size / 128


def default_weight_decay(model_name: str) -> float:
    return 5e-4 if model_name in LARGE_WEIGHT_DECAY_MODELS else 1e-4


def divided_weight_decay(weight_decay: float, branches: int) -> float:
    """wd x exp(1/S - 1): smaller networks, less regularisation (the official non-linear rule)."""
    return weight_decay * math.exp(1.0 / branches - 1.0)


def default_lr_warmup_epochs(epochs: int) -> float:
    return epochs * LR_WARMUP_EPOCHS / REFERENCE_EPOCHS


def default_cot_warmup_epochs(epochs: int) -> int:
    return round(epochs * COT_WARMUP_EPOCHS / REFERENCE_EPOCHS)


def is_no_decay(module: nn.Module, param_name: str) -> bool:
    """Normalisation parameters and biases are not decayed."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return isinstance(module, norms) or param_name == "bias"


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups: decayed weights, and norm parameters and biases without decay."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                (no_decay if is_no_decay(module, name) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class WarmupCosineSchedule:
    """Learning rate per iteration: linear warm-up, then cosine decay with a floor.

    ``lr(T)`` for iteration ``T`` (0-based, counted over the whole run) follows the
    official ``lr_scheduler`` in "cos" mode.  ``step()`` sets the next iteration's rate
    on every parameter group; the state is the iteration counter.
    """

    def __init__(self, optimizer, *, base_lr: float, total_steps: int, warmup_steps: int,
                 warmup_start_lr: float, min_lr: float) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must lie in [0, {total_steps}), got {warmup_steps}")
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_start_lr = min(warmup_start_lr, base_lr)
        self.min_lr = min(min_lr, base_lr)
        self.last_step = 0
        self._apply(self.lr(0))

    def lr(self, step: int) -> float:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            rate = self.warmup_start_lr + step / self.warmup_steps * (self.base_lr - self.warmup_start_lr)
            return min(rate, self.base_lr)
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return max(0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress)), self.min_lr)

    def _apply(self, rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = rate  # a Python float: changing it needs no device work

    def step(self) -> None:
        self.last_step += 1
        self._apply(self.lr(self.last_step))

    def current_lr(self) -> float:
        return self.lr(self.last_step)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply(self.lr(self.last_step))


def cot_weight_for_epoch(epoch: int, weight: float, warmup_epochs: int) -> float:
    """The official per-epoch warm-up: max(weight * epoch / warmup, 0.005) before ``warmup_epochs``."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return max(weight * epoch / warmup_epochs, min(COT_WEIGHT_FLOOR, weight))
    return weight


def describe(groups: Iterable[dict]) -> str:
    return ", ".join(f"{g['name']}: {len(g['params'])} tensors, wd {g['weight_decay']:.3g}" for g in groups)
