"""Which backends the ops tests run, and on which device (shared by the tests in tests/ops)."""

import os

import pytest
import torch

from divco.ops import backends
from divco.ops.triton_backend import kernels_interpreted


def device_for(backend: str) -> torch.device:
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton":
        return torch.device("cpu" if kernels_interpreted() else "cuda")
    return torch.device("cpu")


def backend_available(backend: str) -> bool:
    device = device_for(backend)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    return backends.backend_status(backend, device)[0]


def backend_params(*names: str):
    """pytest.params for the named backends (all four by default), skipped where unavailable."""
    params = []
    for name in names or backends.BACKENDS:
        marks = [pytest.mark.skipif(not backend_available(name), reason=f"backend {name!r} not available here")]
        if device_for(name).type == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


_INTERPRETED = kernels_interpreted()
#: Rows per example: the Triton interpreter runs one Python program per row (~35 ms each).
MAX_ROWS = {"torch": 300, "cpu": 300, "cuda": 300, "triton": 16 if _INTERPRETED else 300}
#: Hypothesis examples per backend test (the interpreter is slow; a GPU is not).
#: DIVCO_TEST_EXAMPLES_SCALE=10 makes a longer soak run.
_SCALE = int(os.environ.get("DIVCO_TEST_EXAMPLES_SCALE", "1"))
_BASE_EXAMPLES = {"torch": 40, "cpu": 40, "cuda": 60, "triton": 12 if _INTERPRETED else 60}
EXAMPLES = {backend: count * _SCALE for backend, count in _BASE_EXAMPLES.items()}
