"""Fused ops: the Divide-and-Co-training objective, the branch ensembles and the branch-wise
BatchNorm (+ residual + ReLU).

    out = divco.ops.cotrain_loss(logits, target, weight=0.5)   # logits [N, S, K]
    out.loss.backward()                                         # Σ_s CE_s + weight · J
    out.ce, out.cot, out.ensemble, out.correct                  # detached by-products
    probs = divco.ops.ensemble(logits, "mean_probs")            # [N, K]
    y = divco.ops.batch_norm(x, weight, bias, running_mean, running_var, activation="relu")

Backends (divco.vocabulary.BACKENDS): "torch" (the readable reference), "triton", and
"cpu" / "cuda" (the native extension divco._C when built); see :mod:`divco.ops.backends`
for defaults and DIVCO_BACKEND.

Layout: one module per op holds its whole story (public function, schema, fake, autograd,
Triton launcher): cotrain_loss.py, ensemble.py, batch_norm.py. Beside them, one file per shared piece:
backends.py (which backend runs: availability, defaults, resolve_backend), schema.py (operator
names ``divco::<op>_<native|triton>`` and schemas), registration.py (fakes and autograd with
torch.library, the double-backward error), triton_backend.py (whether Triton is usable, how a
launcher is defined and launched), validation.py (input checks), reference.py (the float64
reference every backend is tested against).

Adding an op is one new module divco/ops/<op>.py plus its kernels (kernels/<op>.py for
Triton, csrc/divco/ops/{cpu,cuda}/<op>_* for the extension; docs/ARCHITECTURE.md "How to add"):
  1. ``declare("<op>", "(...) -> ...")`` its schema (and "<op>_backward"'s if it has one); the
     C++ side ``m.def``s ``<op>_native`` with the same string (csrc/divco/ops/registration.cpp)
     and lists it in divco.ops.backends.NATIVE_OPERATORS;
  2. define the Triton launcher with ``@triton_backend.define("<op>")`` (annotated like the
     schema; launch under ``triton_backend.device_guard`` and ``quiet_interpreter``);
  3. ``registration.register("<op>", suffix, fake=..., backward=..., setup_context=...)`` for
     each suffix in ``registration.defined_suffixes()``;
  4. the public function checks its inputs (validation.py), picks a backend with
     ``backends.resolve_backend`` and calls ``schema.operator("<op>", backend)`` (or the
     reference for "torch");
  5. import it here and test it against the reference in tests/ops/.
"""

from ..vocabulary import BACKENDS, COTRAIN_KINDS, ENSEMBLE_MODES
from .backends import available_backends
from .cotrain_loss import CotrainLoss, cotrain_loss
from .ensemble import ensemble
from .batch_norm import batch_norm  # noqa: I001  (after the ops above: the order they register in)

#: Co-training kinds (divco.vocabulary.COTRAIN_KINDS), kept under the name divco.ops has exported.
KINDS = COTRAIN_KINDS

__all__ = ["cotrain_loss", "ensemble", "batch_norm", "available_backends", "CotrainLoss", "BACKENDS", "KINDS",
           "ENSEMBLE_MODES"]
