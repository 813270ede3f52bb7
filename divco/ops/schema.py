"""The operator contract: names and schemas of the divco:: operators, shared by every backend.

Each op declares its schema once, in its own module (divco/ops/<op>.py); the native extension
registers ``divco::<op>_native`` with exactly that string in C++ (TORCH_LIBRARY(divco, m)),
the Triton backend ``divco::<op>_triton``. Names are regular: ``divco::<op>_<suffix>``, with
the suffix of a backend from divco.vocabulary.OPERATOR_SUFFIX (the "cpu" and "cuda" backends
share one native operator with two dispatch keys); an op's backward operator is the op
``<op>_backward``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..vocabulary import OPERATOR_SUFFIX

NAMESPACE = "divco"

#: The schema of every declared op, without the operator name (what custom_op takes).
_SCHEMAS: dict[str, str] = {}


def declare(base: str, schema: str) -> str:
    """Record ``base``'s schema (called once by the op's module); returns the schema."""
    if _SCHEMAS.setdefault(base, schema) != schema:
        raise ValueError(f"operator {base!r} is already declared with another schema: {_SCHEMAS[base]}")
    return schema


def op_name(base: str, suffix: str) -> str:
    """Unqualified operator name: ``op_name("ensemble_backward", "native")`` is
    ``ensemble_backward_native``. ``suffix`` is "native" or "triton" (OPERATOR_SUFFIX's values)."""
    if base not in _SCHEMAS:
        raise ValueError(f"unknown operator {base!r}; expected one of {sorted(_SCHEMAS)}")
    if suffix not in OPERATOR_SUFFIX.values():
        raise ValueError(f"operator suffix must be one of {sorted(set(OPERATOR_SUFFIX.values()))}, got {suffix!r}")
    return f"{base}_{suffix}"


def qualified_name(base: str, suffix: str) -> str:
    """``divco::<base>_<suffix>``, the name torch.library knows the operator by."""
    return f"{NAMESPACE}::{op_name(base, suffix)}"


def full_schema(base: str, suffix: str) -> str:
    """The schema as C++ ``m.def(...)`` spells it, operator name included."""
    return op_name(base, suffix) + _SCHEMAS[base]


#: (base, backend) -> its operator, looked up once (the name checks and the attribute lookup
#: cost microseconds per call at small sizes; operators never change once defined).
_OPERATORS: dict[tuple[str, str], object] = {}


def operator(base: str, backend: str):
    """The operator ``torch.ops.divco.<base>_<suffix>`` that runs ``base`` on a compiled backend."""
    found = _OPERATORS.get((base, backend))
    if found is None:
        found = getattr(torch.ops.divco, op_name(base, OPERATOR_SUFFIX[backend]))
        _OPERATORS[base, backend] = found
    return found


def signature(schema: str) -> tuple:
    """What callers rely on in a schema: the arguments (name, type, default) and the return
    types. Return names are left out: torch 2.11 infers triton_op schemas from annotations
    (ignoring ``schema=``), which cannot name outputs."""
    parsed = torch._C.parse_schema("op" + schema if schema.startswith("(") else schema)
    arguments = tuple((a.name, str(a.type), a.default_value) for a in parsed.arguments)
    return arguments, tuple(str(r.type) for r in parsed.returns)


class CotrainLoss(NamedTuple):
    """What :func:`divco.ops.cotrain_loss` returns, on every backend (the reference included:
    here, so that the op module and divco.ops.reference import it without importing each other).

    loss      differentiable 0-dim: Σ_s CE_s + weight · J
    ce        [S] detached: each branch's cross-entropy, (sample-weighted) mean over the batch
    cot       0-dim detached: the co-training term J (before the weight; sample-weighted)
    ensemble  [N, K] detached: mean of the branch logits
    correct   [S+1] int64: top-1 hits of each branch, then of the ensemble
    """

    loss: Tensor
    ce: Tensor
    cot: Tensor
    ensemble: Tensor
    correct: Tensor
