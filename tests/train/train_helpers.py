"""Small real training configurations shared by the training tests."""

from __future__ import annotations

import os
from pathlib import Path

from divco.data import AugmentConfig
from divco.train import TrainConfig

REPO = Path(__file__).resolve().parents[2]

#: The digits at 8x8 (their native resolution) through WRN-16-4: real data, a real network,
#: a fraction of a second per step on one core.
TINY = dict(model="wide_resnet16_4", data="digits", image_size=8, progress=False, tensorboard=False,
            augment=AugmentConfig(crop_padding=1))


def tiny_config(out, **overrides) -> TrainConfig:
    values = dict(TINY, branches=2, epochs=2, batch_size=16, train_subset=64, test_subset=32, out=str(out))
    values.update(overrides)
    return TrainConfig(**values)


def subprocess_env() -> dict:
    """Environment for child processes: one thread each (the test workers already share the cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    return env
