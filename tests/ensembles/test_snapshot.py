"""Snapshot Ensembles' cyclic cosine schedule: hand-computed values, positions, LambdaLR and resume."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from divco.ensembles.snapshot import SnapshotSchedule


def test_two_cycles_of_five():
    s = SnapshotSchedule(total_iterations=10, cycles=2)
    assert s.cycle_length == 5
    expected = [0.5 * (math.cos(math.pi * k / 5) + 1) for k in range(5)] * 2
    assert [s.factor(t) for t in range(1, 11)] == pytest.approx(expected, abs=1e-15)
    assert s.factor(1) == 1.0 and s.factor(6) == 1.0  # restarts
    assert s.lr(3, 0.2) == pytest.approx(0.1 * (math.cos(2 * math.pi / 5) + 1))
    assert s.snapshot_iterations() == [5, 10]
    assert [t for t in range(1, 11) if s.is_snapshot_iteration(t)] == [5, 10]


def test_uneven_cycles_follow_ceil():
    s = SnapshotSchedule(total_iterations=10, cycles=3)  # ceil(10/3) = 4: cycles 1-4, 5-8, 9-10
    assert s.cycle_length == 4
    assert s.snapshot_iterations() == [4, 8, 10]
    assert s.position(7) == (1, 2) and s.position(9) == (2, 0) and s.position(10) == (2, 1)
    assert s.factor(10) == pytest.approx(0.5 * (math.cos(math.pi / 4) + 1))


def test_one_cycle_is_plain_cosine_annealing():
    s = SnapshotSchedule(total_iterations=4, cycles=1)
    assert [s.factor(t) for t in (1, 2, 3, 4)] == pytest.approx([1.0, 0.5 * (math.cos(math.pi / 4) + 1), 0.5,
                                                                0.5 * (math.cos(3 * math.pi / 4) + 1)])


@pytest.mark.parametrize("T, M", [(5, 4), (0, 1), (10, 0), (10.0, 2)])
def test_rejects_empty_cycles_and_bad_numbers(T, M):
    with pytest.raises(ValueError, match="cycle|total_iterations|cycles"):
        SnapshotSchedule(T, M)


def test_rejects_iterations_out_of_range():
    s = SnapshotSchedule(10, 2)
    for t in (0, 11, 2.0):
        with pytest.raises(ValueError, match=r"iteration must be an int in \[1, 10\]"):
            s.position(t)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 500), M=st.integers(1, 12))
def test_every_cycle_restarts_at_lr0_and_ends_with_a_snapshot(T, M):
    if (M - 1) * -(-T // M) >= T:
        return
    s = SnapshotSchedule(T, M)
    snaps = s.snapshot_iterations()
    assert len(snaps) == M and snaps[-1] == T and snaps == sorted(set(snaps))
    starts = [1] + [t + 1 for t in snaps[:-1]]
    assert all(s.factor(t) == 1.0 and s.position(t).step_in_cycle == 0 for t in starts)
    assert all(0 < s.factor(t) <= 1 for t in range(1, T + 1))


def _run(schedule, steps, scheduler_state=None, optimizer_state=None):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = schedule.scheduler(optimizer)
    if scheduler_state is not None:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, scheduler.state_dict(), optimizer.state_dict()


def test_lambda_lr_follows_the_formula_and_resumes_exactly():
    schedule = SnapshotSchedule(12, 3)
    lrs, _, _ = _run(schedule, 12)
    assert lrs == pytest.approx([schedule.lr(t, 0.1) for t in range(1, 13)], rel=1e-12)
    first, sched_state, opt_state = _run(schedule, 7)
    rest, _, _ = _run(schedule, 5, sched_state, opt_state)
    assert first + rest == lrs
