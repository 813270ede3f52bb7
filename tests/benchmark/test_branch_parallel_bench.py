"""The branch-parallel benchmark's arithmetic and report (the counted bytes are checked in
tests/train/test_branch_parallel_distributed.py, in real gloo processes)."""

from __future__ import annotations

import pytest

from divco.benchmark.branch_parallel import format_records, ring_bytes, run
from divco.train.branch_parallel.loop import LoopConfig


def test_ring_bytes_of_the_two_collectives():
    assert ring_bytes("all_gather", 100, 4) == 300  # every other process receives this process's block
    assert ring_bytes("all_reduce", 100, 4) == 150  # reduce-scatter + all-gather of the buffer: 2(P-1)/P


def test_report_names_both_modes_and_their_ratio():
    records = [
        {"mode": "branch-parallel", "branch_groups": 2, "processes": 2, "bytes_per_step": {"all_gather": 640.0},
         "ring_bytes_per_step": {"all_gather": 640.0}, "step_seconds": 0.5},
        {"mode": "data-parallel", "branch_groups": 1, "processes": 2, "bytes_per_step": {"all_reduce": 6400.0},
         "ring_bytes_per_step": {"all_reduce": 6400.0}, "step_seconds": 1.0},
    ]
    text = format_records(records, LoopConfig())
    assert "branch-parallel   2" in text and "data-parallel     1" in text
    assert "hands 10x the bytes" in text and "data/branch = 2.00" in text


def test_run_needs_a_timed_step():
    with pytest.raises(ValueError, match="steps must be >= 2, got 1"):
        run(LoopConfig(steps=1))
