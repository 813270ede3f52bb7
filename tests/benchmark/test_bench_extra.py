"""`pip install "divco[bench]"` must bring everything the plots and the Packed-Ensembles method
import (a user without matplotlib got no plots). torch-uncertainty's packed models
import lightning, rich, scipy, torchmetrics, einops and yaml, but declare only einops and
seaborn; lightning brings torchmetrics and PyYAML."""

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: What `divco bench` imports beyond divco's own dependencies (the plots, Packed-Ensembles).
NEEDED = {"matplotlib", "torch-uncertainty", "lightning", "rich", "scipy"}


def _bench_extra() -> set[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {re.split(r"[<>=!~; \[]", spec, maxsplit=1)[0].lower() for spec in extras["bench"]}


def test_bench_extra_installs_what_plots_and_packed_ensembles_import():
    missing = NEEDED - _bench_extra()
    assert not missing, f"the bench extra lacks {sorted(missing)}"
