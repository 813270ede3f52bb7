"""Fixtures of the training tests: a private data cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory):
    """Decoded data is cached in this session's temporary folder, never in the user's home."""
    previous = os.environ.get("DIVCO_CACHE_DIR")
    os.environ["DIVCO_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "divco-cache")
    yield
    if previous is None:
        os.environ.pop("DIVCO_CACHE_DIR", None)
    else:
        os.environ["DIVCO_CACHE_DIR"] = previous
