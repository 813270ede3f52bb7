"""Shared test setup: deterministic seeds, one intra-op thread per xdist worker."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; the variable must be
    # set before triton.jit decorates them, i.e. before divco.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
