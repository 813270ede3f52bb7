"""stack / unstack: move between S ordinary models and one branch-batched model.

Every ``Branch*`` layer stores its S standard tensors concatenated along dim 0 and
a branch-batched model has the same module names as its standalone branches, so
the conversion is a concatenation (stack) or a slice (unstack) per state-dict
entry, with no other transformation.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .models.base import BranchBatchedNetwork
from .models.registry import check_branch_count
from .models.standalone import describe_standalone, known_kinds, register_standalone  # noqa: F401  (the public hook)
from .nn import BRANCH_LAYERS


def _describe(model: nn.Module, position: int) -> tuple[type, object]:
    if isinstance(model, BranchBatchedNetwork):
        if model.branches != 1:
            raise ValueError(
                f"stack expects ordinary models (divco models with branches=1); "
                f"model {position} has {model.branches} branches"
            )
        return type(model), model.spec
    described = describe_standalone(model)
    if described is not None:
        return described
    known = known_kinds()
    raise ValueError(
        f"stack does not know how to batch model {position} of type {type(model).__qualname__}; "
        f"expected a divco model with branches=1{' or one of: ' + known if known else ''}"
    )


def _check_branch_layers_only(model: nn.Module) -> None:
    for name, module in model.named_modules():
        has_state = any(True for _ in module.parameters(recurse=False)) or any(
            b is not None for b in module._buffers.values()
        )
        if has_state and not isinstance(module, BRANCH_LAYERS):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) holds parameters or buffers but is not a "
                f"branch-batched layer, so its weights cannot be split per branch"
            )


def _training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _apply_training_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, m in model.named_modules():
        if name in flags:
            m.training = flags[name]


def branch_state_dict(model: BranchBatchedNetwork, index: int) -> dict[str, Tensor]:
    """Branch ``index``'s state dict, with the keys of the standalone model (copies)."""
    if not 0 <= index < model.branches:
        raise ValueError(f"branch index must be in [0, {model.branches}), got {index}")
    _check_branch_layers_only(model)
    S = model.branches
    state = {}
    for key, value in model.state_dict().items():
        if value.dim() == 0:  # shared scalars: num_batches_tracked
            state[key] = value.clone()
        else:
            state[key] = value.chunk(S, dim=0)[index].clone()
    return state


@torch.no_grad()
def stack(models: Sequence[nn.Module], *, execution: str = "auto") -> BranchBatchedNetwork:
    """One branch-batched model from S ordinary models of one architecture.

    Weights, buffers (BN running statistics) and each module's train/eval mode are
    carried over; branch ``s`` is ``models[s]``.  The models must share their
    architecture, device and dtype.
    """
    models = list(models)
    if not models:
        raise ValueError("stack expects a non-empty sequence of models")
    check_branch_count(len(models))  # before any copy: the limit of divco.models.create
    described = [_describe(m, i) for i, m in enumerate(models)]
    cls, spec = described[0]
    for i, (cls_i, spec_i) in enumerate(described[1:], start=1):
        if cls_i is not cls or spec_i != spec:
            raise ValueError(
                f"stack expects models of one architecture: model 0 is {cls.__name__}({spec}), "
                f"model {i} is {cls_i.__name__}({spec_i})"
            )
    reference = next(iter(models[0].state_dict().values()))
    for i, m in enumerate(models):
        t = next(iter(m.state_dict().values()))
        if t.device != reference.device or t.dtype != reference.dtype:
            raise ValueError(
                f"stack expects models on one device and dtype: model 0 is on {reference.device} "
                f"({reference.dtype}), model {i} on {t.device} ({t.dtype})"
            )
    flags = _training_flags(models[0])
    for i, m in enumerate(models[1:], start=1):
        if _training_flags(m) != flags:
            raise ValueError(
                f"stack expects every model in the same train/eval mode, module by module; "
                f"model {i} differs from model 0"
            )

    batched = cls(spec, branches=len(models), execution=execution)
    batched.to(device=reference.device, dtype=reference.dtype)
    states = [m.state_dict() for m in models]
    target = batched.state_dict()
    if set(states[0]) != set(target):
        missing = sorted(set(target) - set(states[0]))[:5]
        extra = sorted(set(states[0]) - set(target))[:5]
        raise ValueError(f"state-dict keys differ from the batched model's: missing {missing}, unexpected {extra}")
    merged = {}
    for key, value in target.items():
        parts = [s[key] for s in states]
        merged[key] = parts[0].clone() if value.dim() == 0 else torch.cat(parts, dim=0)
    batched.load_state_dict(merged, strict=True)
    _apply_training_flags(batched, flags)
    return batched


@torch.no_grad()
def unstack(model: BranchBatchedNetwork) -> list[nn.Module]:
    """S standalone ordinary models, one per branch (copies of the weights).

    The CIFAR family gives divco models with ``branches=1``; the ImageNet family
    gives torchvision ResNets.  ``stack(unstack(m))`` reproduces ``m`` exactly.
    """
    if not isinstance(model, BranchBatchedNetwork):
        raise ValueError(f"unstack expects a divco BranchBatchedNetwork, got {type(model).__qualname__}")
    flags = _training_flags(model)
    reference = next(iter(model.state_dict().values()))
    result = []
    for s in range(model.branches):
        standalone = model.standalone_model().to(device=reference.device, dtype=reference.dtype)
        standalone.load_state_dict(branch_state_dict(model, s), strict=True)
        _apply_training_flags(standalone, flags)
        result.append(standalone)
    return result
