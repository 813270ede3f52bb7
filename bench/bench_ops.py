"""pytest-benchmark wrappers of the fused-op micro-benchmarks (the steps live in
divco.benchmark.ops; pytest-benchmark does the timing here).

    python -m pytest bench/bench_ops.py --benchmark-group-by=group
    python -m pytest bench/bench_ops.py -k "K32000" --benchmark-compare   # vs a saved run

One group per problem size; inside it "eager" (the torch reference), "compiled"
(torch.compile of it) and every fused backend available on this device.
"""

import pytest
import torch

from divco.benchmark.ops import CASES, implementations, make_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", implementations(DEVICE))
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.label)
def test_cotrain_loss_forward_backward(benchmark, case, impl):
    step = make_step(impl, case, DEVICE)
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        step()
    _sync()
    benchmark.group = case.label
    benchmark.extra_info.update(impl=impl, device=DEVICE.type, threads=torch.get_num_threads())

    def timed():
        step()
        _sync()

    benchmark(timed)
