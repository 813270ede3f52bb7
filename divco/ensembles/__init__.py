"""Ensembles beyond co-training: CBNN (boosting by checkpoints), Snapshot Ensembles, independent
members, and the ensemble-size curve (Kondratyuk et al. 2020). See docs/ENSEMBLES.md.

Self-contained building blocks; the training engine and the CLI wire them in.
"""

from .boosting import (ERROR_KINDS, BoostingRound, BoostingState, checkpoint_epochs, checkpoint_errors, loss_weights,
                       samme_update, soft_errors)
from .combine import (WEIGHTED_ENSEMBLE_MODES, ensemble_prediction, ensemble_probabilities, normalized_weights,
                      weighted_ensemble)
from .snapshot import CyclePosition, SnapshotSchedule

__all__ = [
    "ERROR_KINDS", "BoostingRound", "BoostingState", "checkpoint_epochs", "checkpoint_errors", "loss_weights",
    "samme_update", "soft_errors",
    "WEIGHTED_ENSEMBLE_MODES", "ensemble_prediction", "ensemble_probabilities", "normalized_weights",
    "weighted_ensemble",
    "CyclePosition", "SnapshotSchedule",
]
