"""Fixtures of the native-extension tests: the built module divco._C."""

import importlib
import os

import pytest
import torch


def native_build_disabled() -> bool:
    """DIVCO_NO_NATIVE=1 installs divco without the extension: its tests are skipped then."""
    return os.environ.get("DIVCO_NO_NATIVE", "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="session")
def native():
    """divco._C, imported (which registers torch.ops.divco.*_native). A missing extension is a
    failure, not a skip: the install builds it unless DIVCO_NO_NATIVE=1."""
    if native_build_disabled():
        pytest.skip("DIVCO_NO_NATIVE=1: divco was installed without the native extension")
    return importlib.import_module("divco._C")


@pytest.fixture
def ops(native):
    """torch.ops.divco, with the native operators registered."""
    return torch.ops.divco
