"""Divide-and-co-training: the training engine, evaluation, checkpoints and export.

    from divco.train import TrainConfig, train
    result = train(TrainConfig(model="wide_resnet16_4", branches=4, data="digits", epochs=10,
                               batch_size=64, out="runs/digits-s4"))
    print(result.final.table())

The command line equivalents are ``divco train``, ``divco eval``, ``divco export`` and
``divco compare``; distributed runs go through ``torchrun -m divco train``.
"""

from .checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import TrainConfig
from .engine import TIMING_FIELDS, TrainResult, train
from .evaluation import ENSEMBLE_MODES, EvaluationResult, Scores, evaluate, metrics_from_logits, predict
from .export import export_branches, load_branch, read_branch_metadata
from .recipe import default_weight_decay, divided_weight_decay, parameter_groups
from .run_log import read_metrics
from .schedules import WarmupCosineSchedule
from .step import RunningMetrics, TrainStep

__all__ = [
    "ENSEMBLE_MODES",
    "EvaluationResult",
    "RunningMetrics",
    "Scores",
    "TIMING_FIELDS",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "WarmupCosineSchedule",
    "default_weight_decay",
    "divided_weight_decay",
    "evaluate",
    "export_branches",
    "list_checkpoints",
    "load_branch",
    "load_checkpoint",
    "metrics_from_logits",
    "model_from_checkpoint",
    "parameter_groups",
    "predict",
    "read_branch_metadata",
    "read_metrics",
    "save_checkpoint",
    "train",
]
