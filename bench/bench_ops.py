"""pytest-benchmark wrappers of the fused-op micro-benchmarks (the steps live in
divco.benchmark.ops; pytest-benchmark does the timing here).

    python -m pytest bench/bench_ops.py --benchmark-group-by=group
    python -m pytest bench/bench_ops.py -k "K32000" --benchmark-compare   # vs a saved run

One group per problem size; inside it "eager" (the torch reference), "compiled"
(torch.compile of it) and every fused backend available on this device. HOST_CASES are tiny
sizes, where a step is the host's per-call cost (checks, dispatch, autograd): there a fused
backend must not be slower than eager.
"""

import pytest
import torch

from divco.benchmark.ops import CASES, HOST_CASES, implementations, make_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", implementations(DEVICE))
@pytest.mark.parametrize("case", CASES + HOST_CASES, ids=lambda case: case.label)
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


ENSEMBLE_SHAPE = (256, 4, 1000)  # N, S, K: a batch of ImageNet-sized heads
ENSEMBLE_WEIGHTS = (0.4, 0.3, 0.2, 0.1)


def _ensemble_backends():
    """The torch reference and every fused backend worth timing here (not the interpreter)."""
    from divco.ops import backends
    from divco.ops.triton_backend import kernels_interpreted

    return [b for b in backends.available_backends(DEVICE) if not (b == "triton" and kernels_interpreted())] + (
        [] if "torch" in backends.available_backends(DEVICE) else ["torch"])


@pytest.mark.parametrize("weighted", [False, True], ids=["equal", "weighted"])
@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs", "geo_mean", "vote"])
@pytest.mark.parametrize("backend", _ensemble_backends())
def test_ensemble_forward_backward(benchmark, backend, mode, weighted):
    """divco.ops.ensemble forward + backward, with and without per-branch weights:
    the cost of weights is the ratio of the two rows of one group."""
    from divco.ops import ensemble

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*ENSEMBLE_SHAPE, generator=g).to(DEVICE).requires_grad_()
    weights = torch.tensor(ENSEMBLE_WEIGHTS, device=DEVICE) if weighted else None
    grad_out = torch.randn(ENSEMBLE_SHAPE[0], ENSEMBLE_SHAPE[2], generator=g).to(DEVICE)

    def timed():
        ensemble(logits, mode, weights, backend=backend).backward(grad_out)
        _sync()

    for _ in range(3):
        timed()
    benchmark.group = f"ensemble {mode} N{ENSEMBLE_SHAPE[0]} S{ENSEMBLE_SHAPE[1]} K{ENSEMBLE_SHAPE[2]}"
    benchmark.extra_info.update(backend=backend, weighted=weighted, device=DEVICE.type)
    benchmark(timed)
