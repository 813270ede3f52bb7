"""The fused branch-wise BatchNorm (divco.ops.batch_norm) against eager PyTorch and
torch.compile of the eager block, and a whole training step with set_norm_impl fused vs eager.

    python -m pytest bench/bench_batch_norm.py --benchmark-group-by=group
    python -m pytest bench/bench_batch_norm.py -k "b64 and bn_add_relu" --benchmark-group-by=group

Block groups: forward+backward of BN+add+ReLU (a residual block's end) or BN+ReLU, at the
first-stage activation of WRN-16-8 divided into S=4 branches ([B, 4·64, 32, 32]) and of
ResNet-110 divided into S=2 ([B, 2·12, 32, 32]), batch 64 and 128, NCHW and channels_last;
inside each group "fused", "eager" and "compiled". Step groups: one SGD training step of the
whole model (co-training loss, backward, update), "fused" vs "eager".

Why the large WRN shape gains less on a CPU: at 67 MB per tensor every pass streams from DRAM.
Fused: forward 4 tensor passes (stats, then x and residual in, out), backward 8 (Σ pass over
grad, out, x; then grad, out, x in, dx and the residual's gradient out). Eager: about 9 + 9
(BN stats and normalise, add, in-place ReLU; ReLU backward, BN backward's two passes). The
floor is therefore ~1.5x, reached only where a channel's data stays in cache between the
reduction and the elementwise pass (NCHW: one thread owns a channel, 256 KB per tensor at
batch 64, close to this CPU's 1 MB L2 per core for three tensors).
"""

from __future__ import annotations

import pytest
import torch

import divco
from divco.nn import set_norm_impl
from divco.benchmark import batch_norm as bn_bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

#: (label, channels, height·width side) of the first stage of each divided model.
MODEL_SHAPES = [("wrn16_8_s4", 4 * 64, 32), ("resnet110_s2", 2 * 12, 32)]
BATCHES = [64, 128]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
BLOCKS = ["bn_add_relu", "bn_relu"]
IMPLS = ["fused", "eager", "compiled"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_block_step(impl: str, block: str, shape: tuple[int, int, int, int], memory_format):
    return bn_bench.make_block_step(impl, block, shape, memory_format, DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("model_shape", MODEL_SHAPES, ids=lambda m: m[0])
@pytest.mark.parametrize("block", BLOCKS)
def test_block_forward_backward(benchmark, block, model_shape, batch, fmt, impl):
    label, C, side = model_shape
    step = make_block_step(impl, block, (batch, C, side, side), FORMATS[fmt])
    for _ in range(2):  # warm-up: compilation, allocator
        step()
    _sync()
    benchmark.group = f"{block}-{label}-b{batch}-{fmt}"
    benchmark.extra_info.update(impl=impl, device=DEVICE.type, threads=torch.get_num_threads(), dtype=str(DTYPE))

    def timed():
        step()
        _sync()

    benchmark(timed)


@pytest.mark.parametrize("level", ["op", "module"])
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_host_cost(benchmark, level, impl):
    """Forward + backward of BN+add+ReLU at [2, 4, 2, 2] on the CPU: the kernels take microseconds,
    the time is the host's launch path (checks, dispatch, autograd, running-statistics update).
    Group "host-<level>": fused vs eager; divco.benchmark.batch_norm.host_cost gives the ratio in
    one interleaved run."""
    shape = bn_bench.HOST_SHAPE
    if level == "op":
        step = bn_bench.make_block_step(impl, "bn_add_relu", shape, torch.contiguous_format, "cpu")
    else:
        step = bn_bench.make_module_step(impl, shape, "cpu")
    for _ in range(20):
        step()
    benchmark.group = f"host-{level}"
    benchmark.extra_info.update(impl=impl, device="cpu", threads=torch.get_num_threads())
    benchmark(step)


#: (model name, S, batch) of the training-step rows.
STEP_MODELS = [("wide_resnet16_8", 4, 64), ("resnet110", 2, 64)]


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("model_case", STEP_MODELS, ids=lambda m: f"{m[0]}_s{m[1]}_b{m[2]}")
def test_training_step(benchmark, model_case, impl):
    name, S, batch = model_case
    torch.manual_seed(0)
    model = set_norm_impl(divco.models.create(name, num_classes=100, branches=S), impl).to(DEVICE).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    target = torch.randint(0, 100, (batch,), device=DEVICE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)  # [N, S, K]
        divco.ops.cotrain_loss(logits, target).loss.backward()
        optimizer.step()
        _sync()

    step()
    benchmark.group = f"step-{name}-s{S}-b{batch}"
    benchmark.extra_info.update(impl=impl, device=DEVICE.type, threads=torch.get_num_threads())
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
