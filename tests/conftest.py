"""Shared test setup: deterministic seeds, one intra-op thread per xdist worker, the hypothesis
profiles, and the markers the GPU suite selects by (scripts/gpu_suite.sh):

- ``triton``: a test of the Triton backend (a ``backend`` parameter "triton"). On a GPU it runs
  compiled kernels and is a GPU test (``gpu`` too); on a CPU it runs the interpreter, so the
  suite's dry run counts ``gpu or triton`` to count what a GPU would run.
- ``inductor``: a test that compiles with Inductor (torch.compile's default backend, "inductor"
  in its id, mode="reduce-overhead", a train step with compile=True): minutes of compiles on a
  fresh machine, so the GPU suite runs them in a phase of their own, last.
"""

import functools
import inspect
import os
import re

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; the variable must be
    # set before triton.jit decorates them, i.e. before divco.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from tile_shapes import GPU_MAX_EXAMPLES, shard  # noqa: E402

# Hypothesis draws the same examples on every run (CI must not turn red on a new random draw);
# DIVCO_HYPOTHESIS=explore draws new ones, to look for failures beyond the fixed set.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
# The GPU suite's profile: few fixed examples, shapes from the tile classes of tests/tile_shapes.py
# (which reads the same variable), so the Triton kernels compile few specialisations.
settings.register_profile("gpu", derandomize=True, max_examples=GPU_MAX_EXAMPLES, deadline=None)
settings.load_profile(os.environ.get("DIVCO_HYPOTHESIS", "fixed"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)


def pytest_collection_finish(session):
    """DIVCO_SUITE_COLLECT=FILE (scripts/gpu_suite.sh --dry-run): the selected tests, one line
    each: node id, then 1/0 for the gpu, triton and inductor markers."""
    path = os.environ.get("DIVCO_SUITE_COLLECT")
    if not path:
        return
    with open(path, "w", encoding="utf-8") as out:
        for item in session.items:
            flags = (int(m in item.keywords) for m in ("gpu", "triton", "inductor"))
            out.write("\t".join([item.nodeid, *map(str, flags)]) + "\n")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton kernels (compiled on a GPU, interpreted on a CPU)")
    config.addinivalue_line("markers", "inductor: compiles with Inductor (its own phase of the GPU suite)")
    if os.environ.get("DIVCO_TILE_SHARD"):
        config.pluginmanager.register(WarmUpShard(os.environ["DIVCO_TILE_SHARD"]), "divco-warm-up-shard")


class WarmUpShard:
    """scripts/gpu_suite.sh's Triton warm-up (DIVCO_TILE_SHARD=i/n): process i of n runs every
    hypothesis test on its shard of the cases (tests/tile_shapes.py) and every n-th of the
    other selected tests. Last, after -m/-k deselected: the parametrised backends cycle, so
    every n-th of all tests could be one backend's tests only."""

    def __init__(self, spec: str):
        self.spec = spec

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        fixed = [item for item in items if not draws_hypothesis_examples(item)]
        mine = set(map(id, shard(fixed, self.spec))) if fixed else set()
        keep = [item for item in items if draws_hypothesis_examples(item) or id(item) in mine]
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep


@functools.lru_cache(maxsize=None)
def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


#: torch.compile without a backend= (Inductor), or the reduce-overhead mode (Inductor + CUDA graphs).
_INDUCTOR_SOURCE = re.compile(r"torch\.compile\((?![^)]*backend=)|mode=\"reduce-overhead\"|compile=True")


def is_inductor_test(item) -> bool:
    return "inductor" in item.nodeid or bool(_INDUCTOR_SOURCE.search(_source(getattr(item, "function", None))))


def draws_hypothesis_examples(item) -> bool:
    return "@given(" in _source(getattr(item, "function", None))


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") == "triton":
            item.add_marker(pytest.mark.triton)
        if is_inductor_test(item):
            item.add_marker(pytest.mark.inductor)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
