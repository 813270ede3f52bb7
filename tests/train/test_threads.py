"""intra_op_threads: no oversubscription of the cores by processes and data workers."""

from __future__ import annotations

import pytest

from divco.train.threads import intra_op_threads


@pytest.mark.parametrize("cores, processes, workers, expected", [
    (16, 1, 0, 16), (16, 1, 4, 12), (16, 4, 0, 4), (16, 4, 2, 2), (2, 1, 4, 1), (2, 4, 0, 1),
])
def test_threads_are_the_processes_share_less_its_workers(cores, processes, workers, expected):
    assert intra_op_threads(cores, processes=processes, workers=workers, environment={}) == expected


def test_the_environment_overrides_the_rule():
    assert intra_op_threads(16, processes=4, environment={"DIVCO_NUM_THREADS": "7"}) == 7
    assert intra_op_threads(16, processes=4, environment={"OMP_NUM_THREADS": "3"}) is None  # torch follows it
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match=rf"DIVCO_NUM_THREADS must be a positive int .*got '{bad}'"):
            intra_op_threads(16, environment={"DIVCO_NUM_THREADS": bad})
