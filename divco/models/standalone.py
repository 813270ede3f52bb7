"""Ordinary (non-divco) models that :func:`divco.stack` can batch, registered by the families.

This is what :mod:`divco.stacking` and the model families share: a family that can
represent some ordinary model (e.g. torchvision's ResNet) registers a ``describe``
function here, and ``stack`` asks the registered kinds.  It lives in ``models`` so
that no model module imports the higher-level ``divco.stacking``.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Union

from torch import nn

#: ``describe(model) -> (branch-batched class, spec of one branch)``.
Describe = Callable[[nn.Module], tuple[type, object]]

#: A standalone class, or its dotted name ("package.module.Class") for a class of an optional package.
Kind = Union[type, str]

# (kind, describe) in registration order.
STANDALONE_KINDS: list[tuple[Kind, Describe]] = []


def register_standalone(kind: Kind, describe: Describe) -> None:
    """Teach :func:`divco.stack` a kind of ordinary model: ``describe(m) -> (batched_cls, spec)``.

    ``kind`` is the class, or its dotted name for a class of an optional package: the name is
    resolved only once that module has been imported, so registering imports nothing (a model
    of that class cannot exist before its module is imported).
    """
    STANDALONE_KINDS.append((kind, describe))


def resolve_kind(kind: Kind) -> Optional[type]:
    """The class a kind names, or None while its module is not imported."""
    if isinstance(kind, type):
        return kind
    module_name, _, class_name = kind.rpartition(".")
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def kind_name(kind: Kind) -> str:
    return kind if isinstance(kind, str) else kind.__module__ + "." + kind.__qualname__


def describe_standalone(model: nn.Module) -> Optional[tuple[type, object]]:
    """``describe(model)`` of the first registered kind ``model`` is an instance of, else None."""
    for kind, describe in STANDALONE_KINDS:
        resolved = resolve_kind(kind)
        if resolved is not None and isinstance(model, resolved):
            return describe(model)
    return None


def known_kinds() -> str:
    return ", ".join(kind_name(k) for k, _ in STANDALONE_KINDS)
