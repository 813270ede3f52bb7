"""cotrain: Divide-and-Co-training (Zhao et al. 2022), the default method.

One order of the training set, one augmented view per branch, the loss Σ_s CE_s + weight · J
with the co-training weight warmed up per epoch; every hook is TrainingMethod's.
"""

from __future__ import annotations

from .base import TrainingMethod


class Cotrain(TrainingMethod):
    name = "cotrain"
    summary = "cotrain (Divide-and-Co-training)"
    branch_parallel_refusal = ""  # the fused loss on the gathered logits of all S branches
