"""Shared test setup: deterministic seeds, one intra-op thread per xdist worker."""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; the variable must be
    # set before triton.jit decorates them, i.e. before divco.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Hypothesis draws the same examples on every run (CI must not turn red on a new random draw);
# DIVCO_HYPOTHESIS=explore draws new ones, to look for failures beyond the fixed set.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("DIVCO_HYPOTHESIS", "fixed"))

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


# torchvision is optional (divco[vision]). Where it is not installed, a test that fails only
# because it needs torchvision (directly, through divco's torchvision conversions or the data
# pipeline's resize, or in a subprocess it starts) is reported as skipped, naming the extra.
# Where torchvision is installed this changes nothing.
TORCHVISION_MISSING = importlib.util.find_spec("torchvision") is None
NEEDS_TORCHVISION = ("No module named 'torchvision", "needs torchvision")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if TORCHVISION_MISSING and report.failed and call.excinfo is not None:
        if any(marker in report.longreprtext for marker in NEEDS_TORCHVISION):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               'Skipped: needs torchvision (pip install "divco[vision]"), which is not installed')
