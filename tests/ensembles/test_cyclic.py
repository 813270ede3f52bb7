"""The rates of FGE (Garipov et al. 2018), SWA (Izmailov et al. 2018) and cbnn's restarts, as the papers write them."""

from __future__ import annotations

import pytest

from divco.ensembles.cyclic import FgeSchedule, RestartSchedule, SwaSchedule, cosine_pretraining_lr


def test_fge_rates_are_garipovs_triangle_after_the_pretraining():
    rates = FgeSchedule(total=40, pretrain=8, cycle=8, members=4, lr1=0.05, lr2=0.0005, base_lr=0.1)
    assert rates.member_iterations() == [12, 20, 28, 36]  # each cycle's middle
    assert rates.lr(8) == pytest.approx(0.05)  # a cycle starts at lr1
    assert rates.lr(10) == pytest.approx((0.05 + 0.0005) / 2)  # t = 1/4
    assert rates.lr(12) == pytest.approx(0.0005)  # t = 1/2: lr2, the member's iteration trained at lr(11)
    assert rates.lr(11) == pytest.approx(0.25 * 0.05 + 0.75 * 0.0005)  # t = 3/8
    assert rates.lr(14) == pytest.approx((0.05 + 0.0005) / 2)  # t = 3/4, on the way up
    assert rates.lr(16) == pytest.approx(0.05)  # the next cycle
    assert rates.lr(0) == pytest.approx(0.1) and rates.lr(7) < rates.lr(1)  # pre-training: cosine from lr0
    assert FgeSchedule.default_pretrain(40, 8, 4) == 40 - 3 * 8 - 4  # the last member on the last iteration


def test_swa_rates_are_izmailovs_decay_then_constant_or_cyclic():
    rates = SwaSchedule(total=30, start=20, cycle=3, base_lr=0.1, swa_lr=0.05)
    assert [rates.lr(s) for s in (0, 10)] == pytest.approx([0.1, 0.1])  # t <= 0.5: lr0
    assert rates.lr(14) == pytest.approx(0.1 + (0.05 - 0.1) * (0.7 - 0.5) / 0.4)  # linear to swa_lr at t = 0.9
    assert [rates.lr(s) for s in (18, 19, 20, 29)] == pytest.approx([0.05] * 4)
    assert rates.average_iterations() == [23, 26, 29]
    cyclic = SwaSchedule(total=30, start=20, cycle=5, base_lr=0.1, swa_lr=0.05, swa_lr_min=0.01)
    # t(i) = (mod(i - 1, c) + 1) / c for the i-th iteration of the averaging phase (i = step - start + 1)
    assert cyclic.lr(20) == pytest.approx(0.8 * 0.05 + 0.2 * 0.01)
    assert cyclic.lr(24) == pytest.approx(0.01)  # the cycle's last iteration: its minimum, then averaged
    assert cyclic.lr(25) == pytest.approx(0.8 * 0.05 + 0.2 * 0.01)
    assert cyclic.average_iterations() == [25, 30]


def test_the_last_fge_member_may_fall_on_the_last_iteration():
    rates = FgeSchedule(total=20, pretrain=8, cycle=8, members=2, lr1=0.05, lr2=0.0005, base_lr=0.1)
    assert rates.member_iterations() == [12, 20]


@pytest.mark.parametrize("make, message", [
    (lambda: FgeSchedule(total=19, pretrain=8, cycle=8, members=2, lr1=0.05, lr2=0.0005, base_lr=0.1),
     r"need 20 iterations; the run has 19"),
    (lambda: FgeSchedule(total=40, pretrain=8, cycle=8, members=2, lr1=0.05, lr2=0.05, base_lr=0.1),
     r"lr2 must be below .* lr1"),
    (lambda: FgeSchedule(total=40, pretrain=8, cycle=1, members=2, lr1=0.05, lr2=0.01, base_lr=0.1),
     r"cycle must be an int >= 2"),
    (lambda: SwaSchedule(total=30, start=28, cycle=3, base_lr=0.1, swa_lr=0.05), r"averages no model"),
    (lambda: SwaSchedule(total=30, start=20, cycle=3, base_lr=0.1, swa_lr=0.05, swa_lr_min=0.05), r"below swa_lr"),
])
def test_schedules_that_do_not_fit_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_restarts_run_the_recipe_schedule_again_in_every_interval():
    rates = RestartSchedule((10, 20, 30), 0.1, warmup=4, warmup_start_lr=0.005, min_lr=1e-4)
    first = [cosine_pretraining_lr(s, base_lr=0.1, total=10, warmup=4, warmup_start_lr=0.005, min_lr=1e-4)
             for s in range(10)]
    assert [rates.lr(s) for s in range(10)] == pytest.approx(first)
    again = [cosine_pretraining_lr(s, base_lr=0.1, total=10, warmup=0, warmup_start_lr=0.005, min_lr=1e-4)
             for s in range(10)]  # no warm-up after a restart
    assert [rates.lr(s) for s in range(10, 20)] == pytest.approx(again)
    assert [rates.lr(s) for s in range(20, 30)] == pytest.approx(again)
    assert rates.lr(0) == pytest.approx(0.005) and rates.lr(10) == pytest.approx(0.1)
    assert rates.lr(19) < 0.01  # annealed at the member


def test_restart_intervals_must_increase():
    with pytest.raises(ValueError, match=r"ends must be increasing"):
        RestartSchedule((10, 10), 0.1)
