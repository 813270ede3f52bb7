"""Which backends the ops tests run, and on which device (shared by the tests in tests/ops)."""

import os

import pytest
import torch
from tile_shapes import examples

from divco.ops import backends
from divco.vocabulary import ENSEMBLE_MODES
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
EXAMPLES = {backend: examples(count * _SCALE) for backend, count in _BASE_EXAMPLES.items()}  # capped on a GPU


# -- what the native extension supports (it may be built from an older source) ----------------

#: Modes every native build knows; newer builds list theirs in build_info()["ensemble_modes"].
_NATIVE_BASE_MODES = ("mean_logits", "mean_probs", "geo_mean", "max")


def _native_build_info() -> dict:
    if not backends.native_status()[0]:
        return {}
    from divco import _C

    return _C.build_info()


def ensemble_modes_for(backend: str) -> list[str]:
    """The ensemble modes ``backend`` implements: all of them, except on a native build that
    predates a mode (until the native branch adding it is merged)."""
    if backend not in ("cpu", "cuda"):
        return list(ENSEMBLE_MODES)
    supported = _native_build_info().get("ensemble_modes", _NATIVE_BASE_MODES)
    return [mode for mode in ENSEMBLE_MODES if mode in supported]


def requires_edge_semantics(backend: str):
    """skipif for tests of the -inf / ±3e38 / NaN-routing semantics (version 2) on a native build
    that predates them."""
    old = backend in ("cpu", "cuda") and _native_build_info().get("semantics_version", 1) < 2
    return pytest.mark.skipif(old, reason="divco._C predates the edge-value semantics (build_info semantics_version < 2)")


def requires_mode(backend: str, mode: str):
    return pytest.mark.skipif(
        mode not in ensemble_modes_for(backend),
        reason=f"divco._C was built without ensemble mode {mode!r} (build_info ensemble_modes)",
    )


def backend_mode_params(*names: str):
    """pytest.params (backend, mode) for every ensemble mode, skipped where unsupported."""
    return [
        pytest.param(p.values[0], mode, marks=[*p.marks, requires_mode(p.values[0], mode)], id=f"{p.id}-{mode}")
        for p in backend_params(*names)
        for mode in ENSEMBLE_MODES
    ]
