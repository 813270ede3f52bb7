"""Fused co-training ops: the Divide-and-Co-training objective and the branch ensembles.

    out = divco.ops.cotrain_loss(logits, target, weight=0.5)   # logits [N, S, K]
    out.loss.backward()                                         # Σ_s CE_s + weight · J
    out.ce, out.cot, out.ensemble, out.correct                  # detached by-products
    probs = divco.ops.ensemble(logits, "mean_probs")            # [N, K]

Backends: "torch" (the readable reference), "triton", and "cpu" / "cuda" (the native
extension divco._C when built); see :mod:`divco.ops.backends` for defaults and
DIVCO_BACKEND, :mod:`divco.ops.schema` for the operator contract.
"""

from .backends import BACKENDS
from .functional import available_backends, cotrain_loss, ensemble
from .reference import CotrainLoss
from .schema import ENSEMBLE_MODES, KINDS

__all__ = ["cotrain_loss", "ensemble", "available_backends", "CotrainLoss", "BACKENDS", "KINDS", "ENSEMBLE_MODES"]

from .batch_norm import batch_norm  # noqa: E402  (fused BN + residual + ReLU)

__all__ += ["batch_norm"]
