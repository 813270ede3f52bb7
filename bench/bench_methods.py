"""pytest-benchmark wrappers of the training-step comparison (the methods and steps live in
divco.benchmark.methods / .steps; pytest-benchmark does the timing here).

    python -m pytest bench/bench_methods.py --benchmark-group-by=group
    BENCH_MODEL=wide_resnet16_8 BENCH_BATCH=64 python -m pytest bench/bench_methods.py -k "S4"

One group per (model, S): divco batched and per branch, the official loop, vmap,
Packed-Ensembles (when torch-uncertainty is installed) and the undivided network.
For the full comparison with ratios, peak memory and plots, run ``divco bench``.
"""

import os

import pytest
import torch

import divco
from divco.benchmark.methods import METHODS, MethodUnavailable, Workload, build_method
from divco.benchmark.steps import MethodTrainStep, Variant

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL = os.environ.get("BENCH_MODEL", "wide_resnet16_4")
BATCH = int(os.environ.get("BENCH_BATCH", "16"))
SIZE = int(os.environ.get("BENCH_IMAGE_SIZE", "32"))
VARIANT = Variant(torch.bfloat16 if DEVICE.type == "cuda" else None)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("branches", (2, 4), ids=lambda s: f"S{s}")
def test_train_step(benchmark, branches, method):
    workload = Workload(MODEL, branches, 100, SIZE, DEVICE, channels_last=DEVICE.type == "cuda")
    torch.manual_seed(0)
    divided = divco.models.create(MODEL, num_classes=100, branches=branches)
    try:
        m = build_method(method, workload, divided)
    except MethodUnavailable as error:
        pytest.skip(str(error))
    images, target = m.train_inputs(BATCH, torch.Generator().manual_seed(1))
    step = MethodTrainStep(m, images, target, VARIANT)
    for _ in range(2):  # warm-up: allocator, oneDNN/cuDNN algorithm choice, momentum buffers
        step()

    def timed():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{MODEL} S={branches} batch {BATCH}"
    benchmark.extra_info.update(method=method, device=DEVICE.type, images=BATCH)
    benchmark(timed)
