"""The operator contract shared by every fused backend (Triton and the native divco._C).

This module is the ONE place that spells the schemas. The native extension registers
``divco::<name>_native`` with exactly these signatures in C++ (TORCH_LIBRARY(divco, m)),
the Triton backend registers ``divco::<name>_triton`` with the same strings, so one
Python wrapper (autograd, fake kernels) serves both.

cotrain_loss_<backend>(logits, target, weight, kind, temperature, compute_grad)
    logits       [N, S, K] float32 / bfloat16 / float16, any strides
    target       int64 [N] class indices, or floating [N, K] soft targets
    weight       0-dim float32 on the logits' device: the co-training weight, read by the
                 kernel (so a warm-up schedule changes no graph and needs no host sync)
    kind         "js" | "kl"
    temperature  > 0 (co-training term only; the cross-entropy uses no temperature)
    compute_grad write dloss/dlogits (for grad_output = 1) during the forward pass
  -> loss     0-dim float32        sum_s CE_s + weight * J
     ce       [S] float32          CE_s, mean over the batch
     cot      0-dim float32        J, the co-training term (unweighted)
     ensemble [N, K] logits dtype  mean of the branch logits
     correct  [S+1] int64          top-1 hits per branch, then of the ensemble
     grad     [N, S, K] contiguous, logits dtype, or shape [0] when compute_grad is false

ensemble_<backend>(logits, mode) -> [N, K] in logits dtype
ensemble_<backend>_backward(grad_out, logits, mode) -> [N, S, K] contiguous, logits dtype
"""

NAMESPACE = "divco"

from ..vocabulary import COTRAIN_KINDS as KINDS  # noqa: F401  (re-exported by divco.ops)
from ..vocabulary import ENSEMBLE_MODES  # noqa: F401

#: The schemas without the operator name (what torch.library.custom_op / triton_op take).
COTRAIN_LOSS_SCHEMA = (
    "(Tensor logits, Tensor target, Tensor weight, str kind, float temperature, bool compute_grad)"
    " -> (Tensor loss, Tensor ce, Tensor cot, Tensor ensemble, Tensor correct, Tensor grad)"
)
ENSEMBLE_SCHEMA = "(Tensor logits, str mode) -> Tensor"
ENSEMBLE_BACKWARD_SCHEMA = "(Tensor grad_out, Tensor logits, str mode) -> Tensor"


_SCHEMAS = {
    "cotrain_loss": COTRAIN_LOSS_SCHEMA,
    "ensemble": ENSEMBLE_SCHEMA,
    "ensemble_backward": ENSEMBLE_BACKWARD_SCHEMA,
}


def op_name(base: str, backend: str) -> str:
    """Unqualified operator name of ``base`` for ``backend`` ("native" or "triton").

    ``cotrain_loss`` -> ``cotrain_loss_native``; ``ensemble`` -> ``ensemble_native``;
    ``ensemble_backward`` -> ``ensemble_native_backward``.
    """
    if base not in _SCHEMAS:
        raise ValueError(f"unknown operator {base!r}; expected one of {sorted(_SCHEMAS)}")
    if base == "ensemble_backward":
        return f"ensemble_{backend}_backward"
    return f"{base}_{backend}"


def qualified_name(base: str, backend: str) -> str:
    """``divco::<name>``, the name torch.library knows the operator by."""
    return f"{NAMESPACE}::{op_name(base, backend)}"


def full_schema(base: str, backend: str) -> str:
    """The schema as C++ ``m.def(...)`` spells it, operator name included."""
    return op_name(base, backend) + _SCHEMAS[base]


def signature(schema: str) -> tuple:
    """What callers rely on in a schema: the arguments (name, type, default) and the return
    types. Return names are left out: torch 2.11 infers triton_op schemas from annotations
    (ignoring ``schema=``), which cannot name outputs."""
    import torch

    parsed = torch._C.parse_schema("op" + schema if schema.startswith("(") else schema)
    arguments = tuple((a.name, str(a.type), a.default_value) for a in parsed.arguments)
    return arguments, tuple(str(r.type) for r in parsed.returns)
