"""The model registry: ``create(name, num_classes=..., branches=S, **kw)`` and ``list()``."""

from __future__ import annotations

import builtins
import difflib
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str  # "cifar" or "imagenet"
    builder: Callable[..., nn.Module]
    default_num_classes: int
    input_size: tuple[int, int, int]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register(
    name: str,
    *,
    family: str,
    default_num_classes: int,
    input_size: tuple[int, int, int],
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(num_classes=..., branches=..., **kw)`` as ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, family, builder, default_num_classes, input_size, description)
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY.keys(), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint}. divco.models.list() gives all {len(_REGISTRY)} names"
        ) from None


def create(name: str, num_classes: Optional[int] = None, branches: int = 1, **kwargs) -> nn.Module:
    """Build a registered model divided into ``branches`` small networks.

    ``branches=1`` is the ordinary undivided network; ``branches=S>1`` applies the
    paper's dividing rule (width divided by sqrt(S), so the total parameter count
    stays about the same; cardinality divided by S for ResNeXt).  Pass
    ``divide=False`` to keep every branch at full width instead (an ensemble of S
    full-size networks).  ``num_classes`` defaults to 10 for the CIFAR family and
    1000 for the ImageNet family.
    """
    entry = get_entry(name)
    if num_classes is None:
        num_classes = entry.default_num_classes
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(branches, int) or isinstance(branches, bool) or branches < 1:
        raise ValueError(f"branches must be a positive int, got {branches!r}")
    model = entry.builder(num_classes=num_classes, branches=branches, **kwargs)
    model.model_name = name
    return model


def list(family: Optional[str] = None) -> builtins.list[str]:  # noqa: A001 - the API the users asked for
    """Names of the registered models (of one family: "cifar" or "imagenet")."""
    if family is not None and family not in ("cifar", "imagenet"):
        raise ValueError(f"family must be 'cifar', 'imagenet' or None, got {family!r}")
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)
