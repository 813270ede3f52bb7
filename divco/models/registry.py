"""The model registry: ``create(name, num_classes=..., branches=S, **kw)`` and ``list()``."""

from __future__ import annotations

import builtins
import difflib
import inspect
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
    max_branches: int = 0  # the most branches the dividing rule can make (0: MAX_BRANCHES)

    def options(self) -> tuple[str, ...]:
        """The keyword arguments the builder takes besides ``num_classes`` and ``branches``."""
        parameters = inspect.signature(self.builder).parameters.values()
        return tuple(p.name for p in parameters if p.name not in ("num_classes", "branches")
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def branch_limit(self, divide: bool) -> int:
        """The most branches ``create`` accepts (undivided branches are limited by MAX_BRANCHES only)."""
        return min(self.max_branches or MAX_BRANCHES, MAX_BRANCHES) if divide else MAX_BRANCHES


#: The documented upper bound of ``branches`` for every model (``divco.models.MAX_BRANCHES``):
#: beyond it a "divided" network is a crowd of near-empty branches, and a typo (S=1000)
#: would allocate gigabytes before failing.
MAX_BRANCHES = 64

_REGISTRY: dict[str, ModelEntry] = {}


def register(
    name: str,
    *,
    family: str,
    default_num_classes: int,
    input_size: tuple[int, int, int],
    description: str = "",
    max_branches: int = 0,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(num_classes=..., branches=..., <named options>)`` as ``name``.

    The builder names every option it takes (no ``**kwargs``): :func:`create` rejects any
    other keyword argument once, for every model, from the builder's signature.
    ``max_branches``: the most branches the family's dividing rule can make (e.g. a
    ResNeXt's cardinality), 0 for :data:`MAX_BRANCHES`.
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values()):
            raise ValueError(f"the builder of {name!r} must name its options (no **kwargs)")
        _REGISTRY[name] = ModelEntry(name, family, builder, default_num_classes, input_size, description,
                                     max_branches)
        return builder

    return wrap


def check_branch_count(branches: object, limit: int = MAX_BRANCHES, model: Optional[str] = None) -> None:
    """The one branch-count check (``create``, ``divco.stack``): an int in [1, limit], else a ValueError.

    ``limit`` is :data:`MAX_BRANCHES`, or less where a family's dividing rule runs out.
    """
    if not isinstance(branches, int) or isinstance(branches, bool) or branches < 1:
        raise ValueError(f"branches must be a positive int, got {branches!r}")
    if branches > limit:
        why = (f"its dividing rule makes at most {limit} branches" if limit < MAX_BRANCHES
               else f"divco supports at most MAX_BRANCHES = {MAX_BRANCHES} branches")
        where = f" for model {model!r}" if model else ""
        raise ValueError(f"branches must be between 1 and {limit}{where} ({why}), got {branches}")


def get_entry(name: str) -> ModelEntry:
    if not isinstance(name, str):
        raise ValueError(f"model name must be a str (a name from divco.models.list()), got {name!r}")
    try:
        return _REGISTRY[name]
    except KeyError:
        # names that extend what was typed first (resnext50 -> resnext50_32x4d), then the similar ones
        prefixed = sorted(n for n in _REGISTRY if isinstance(name, str) and name and n.startswith(name))
        similar = difflib.get_close_matches(name, _REGISTRY.keys(), n=5, cutoff=0.5)
        close = (prefixed + [n for n in similar if n not in prefixed])[:5]
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

    Everything is checked before any memory is allocated: ``branches`` must lie in
    [1, the family's limit] (:data:`MAX_BRANCHES`, or less where the dividing rule
    runs out, e.g. a ResNeXt's cardinality), and every keyword argument must be one
    the model's builder names.
    """
    entry = get_entry(name)
    if num_classes is None:
        num_classes = entry.default_num_classes
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(branches, int) or isinstance(branches, bool) or branches < 1:
        raise ValueError(f"branches must be a positive int, got {branches!r}")
    allowed = entry.options()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unexpected keyword argument(s) {unknown} for model {name!r}; it takes: "
                         f"{', '.join(allowed)}")
    check_branch_count(branches, entry.branch_limit(bool(kwargs.get("divide", True))), name)
    model = entry.builder(num_classes=num_classes, branches=branches, **kwargs)
    model.model_name = name
    return model


def list(family: Optional[str] = None) -> builtins.list[str]:  # noqa: A001 - the API the users asked for
    """Names of the registered models (of one family: "cifar" or "imagenet")."""
    if family is not None and family not in ("cifar", "imagenet"):
        raise ValueError(f"family must be 'cifar', 'imagenet' or None, got {family!r}")
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)
