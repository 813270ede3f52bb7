"""Ordinary (non-divco) models that :func:`divco.stack` can batch, registered by the families.

This is what :mod:`divco.stacking` and the model families share: a family that can
represent some ordinary model (e.g. torchvision's ResNet) registers a ``describe``
function here, and ``stack`` asks the registered kinds.  It lives in ``models`` so
that no model module imports the higher-level ``divco.stacking``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

#: ``describe(model) -> (branch-batched class, spec of one branch)``.
Describe = Callable[[nn.Module], tuple[type, object]]

# (standalone class, describe) in registration order.
STANDALONE_KINDS: list[tuple[type, Describe]] = []


def register_standalone(kind: type, describe: Describe) -> None:
    """Teach :func:`divco.stack` a kind of ordinary model: ``describe(m) -> (batched_cls, spec)``."""
    STANDALONE_KINDS.append((kind, describe))
