"""The training methods of ``divco train --method``: name -> strategy (divco.train.methods.base).

Adding a method is one module here with a :class:`TrainingMethod` subclass and one line in
:data:`METHODS`; the engine, the configuration, ``--print-config`` and the command line take
it from this table.
"""

from __future__ import annotations

from .base import DEFAULT_CHECKPOINTS, TrainingMethod
from .cbnn import Cbnn
from .checkpoint_ensemble import CheckpointEnsembleMethod
from .cotrain import Cotrain
from .fge import Fge
from .independent import Independent
from .snapshot import Snapshot
from .swa import Swa

#: name -> strategy class, in the order ``--method`` lists them.
METHODS: dict[str, type[TrainingMethod]] = {method.name: method for method in (
    Cotrain,
    Independent,
    Snapshot,
    Cbnn,
    Fge,
    Swa,
)}

DEFAULT_METHOD = "cotrain"


def names() -> tuple[str, ...]:
    return tuple(METHODS)


def method_class(name: str) -> type[TrainingMethod]:
    """The strategy class of method ``name`` (a ValueError naming the known ones otherwise)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {names()}, got {name!r}")
    return METHODS[name]


def create(name: str) -> TrainingMethod:
    """A fresh strategy object for one run of method ``name``."""
    return method_class(name)()


def method_options() -> dict[str, tuple[str, ...]]:
    """Method-only TrainConfig field -> the methods that accept it."""
    owners: dict[str, list[str]] = {}
    for name, cls in METHODS.items():
        for option in sorted(cls.options):
            owners.setdefault(option, []).append(name)
    return {option: tuple(methods) for option, methods in owners.items()}


__all__ = ["DEFAULT_CHECKPOINTS", "DEFAULT_METHOD", "METHODS", "CheckpointEnsembleMethod", "TrainingMethod",
           "create", "method_class", "method_options", "names"]
