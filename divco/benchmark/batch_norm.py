"""Micro-benchmarks of the fused branch-wise BatchNorm block: forward + backward of one step.

A step is: x (and the residual) as leaves -> ``act(batch_norm(x) + residual)`` -> gradients of
x, weight, bias (and residual) for a fixed upstream gradient. Compared on the same inputs, in
one run:

    eager     F.batch_norm, + residual, in-place ReLU (what the models ran before the fused op)
    compiled  torch.compile of that same eager block
    fused     divco.ops.batch_norm (the fastest backend for the device)

Shapes: the first-stage activation of WRN-16-8 divided into S=4 ([B, 4·64, 32, 32]) and of
ResNet-110 divided into S=2 ([B, 2·12, 32, 32]), NCHW and channels_last; bfloat16 on CUDA,
float32 on CPUs. ``run`` returns one record per (case, implementation) in the format of
divco.benchmark.ops (``divco bench`` lists both in its "Fused ops" table);
bench/bench_batch_norm.py wraps the same steps for pytest-benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.batch_norm import batch_norm
from .measure import median, time_cuda, time_interleaved

BLOCKS = ("bn_add_relu", "bn_relu")
IMPLS = ("fused", "eager", "compiled")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class BlockCase:
    """One block at one activation shape [batch, channels, side, side] and memory format."""

    block: str  # "bn_add_relu" | "bn_relu"
    model: str  # the divided model whose first stage has this shape
    batch: int
    channels: int
    side: int
    layout: str = "nchw"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.channels, self.side, self.side


#: The benchmark's shapes at batch 64 (batch 128 doubles every tensor: bench/bench_batch_norm.py).
CASES = tuple(
    BlockCase(block, model, 64, channels, 32, layout)
    for block in BLOCKS
    for model, channels in (("wide_resnet16_8_s4", 4 * 64), ("resnet110_s2", 2 * 12))
    for layout in FORMATS
)


def eager_block(x: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor, r: Optional[Tensor]) -> Tensor:
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    if r is not None:
        y = y + r
    return F.relu(y, inplace=True)  # as the models' nn.ReLU(inplace=True)


def fused_block(x: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor, r: Optional[Tensor]) -> Tensor:
    return batch_norm(x, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5, residual=r, activation="relu")


def block_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_block_step(impl: str, block: str, shape: tuple[int, int, int, int], memory_format: torch.memory_format,
                    device: torch.device | str) -> Callable[[], tuple[Tensor, ...]]:
    """One forward + backward of ``block`` with implementation ``impl`` on fixed random inputs."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    C = shape[1]

    def tensor(*size: int, grad: bool = True) -> Tensor:
        dtype = block_dtype(device) if len(size) == 4 else torch.float32
        t = torch.randn(*size, generator=g).to(device=device, dtype=dtype)
        if len(size) == 4:
            t = t.contiguous(memory_format=memory_format)
        return t.requires_grad_(grad)

    x, grad_out = tensor(*shape), tensor(*shape, grad=False)
    r = tensor(*shape) if block == "bn_add_relu" else None
    w, b = tensor(C), tensor(C)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    fn = {"fused": fused_block, "eager": eager_block}.get(impl) or torch.compile(eager_block)
    leaves = [t for t in (x, w, b, r) if t is not None]

    def step() -> tuple[Tensor, ...]:
        out = fn(x, w, b, rm, rv, r)
        return torch.autograd.grad(out, leaves, grad_out)

    return step


def run(
    device: torch.device | str = "cpu",
    cases: Iterable[BlockCase] = CASES,
    *,
    repeats: Optional[int] = None,
    warmup: int = 2,
    compiled: bool = True,
) -> list[dict]:
    """Time every implementation on every case; one record per (case, implementation).

    Records: op ("batch_norm"), block, model, N, C, HW, layout, dtype, device, threads, impl,
    median_ms, speedup_vs_eager (eager median / this median, both from this run), repeats, times_s.
    ``repeats`` defaults to 20 on CUDA and 5 on CPUs (each CPU step takes tens of milliseconds).
    """
    device = torch.device(device)
    impls = [i for i in IMPLS if compiled or i != "compiled"]
    records = []
    for case in cases:
        steps = {impl: make_block_step(impl, case.block, case.shape, FORMATS[case.layout], device) for impl in impls}
        n = repeats or (20 if device.type == "cuda" else 5)
        if device.type == "cuda":
            times = {name: time_cuda(step, n, warmup=warmup) for name, step in steps.items()}
        else:
            times = time_interleaved(steps, n, warmup=warmup)
        eager = median(times["eager"])
        for impl, samples in times.items():
            mid = median(samples)
            records.append({
                "op": "batch_norm", "block": case.block, "model": case.model, "N": case.batch, "C": case.channels,
                "HW": case.side * case.side, "layout": case.layout,
                "dtype": str(block_dtype(device)).removeprefix("torch."), "device": device.type,
                "threads": torch.get_num_threads() if device.type == "cpu" else None, "impl": impl,
                "median_ms": mid * 1e3, "speedup_vs_eager": eager / mid, "repeats": n, "times_s": samples,
            })
    return records


# -- host cost ---------------------------------------------------------------------------------------

#: A tensor so small ([2, 4, 2, 2]: 32 values) that a step's kernels take a few microseconds:
#: what remains of its time is the host's (Python, dispatcher, autograd, allocation).
HOST_SHAPE = (2, 4, 2, 2)


def make_module_step(impl: str, shape: tuple[int, int, int, int] = HOST_SHAPE,
                     device: torch.device | str = "cpu") -> Callable[[], tuple[Tensor, ...]]:
    """Forward + backward of ``relu(bn(x) + residual)`` through a BranchBatchNorm2d with
    ``impl`` ("fused" or "eager"): what a model's residual block runs."""
    from ..nn import BranchBatchNorm2d, set_norm_impl

    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    bn = set_norm_impl(BranchBatchNorm2d(shape[1], branches=1), impl).to(device).train()
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    r = torch.randn(shape, generator=g).to(device).requires_grad_()
    grad_out = torch.randn(shape, generator=g).to(device)
    leaves = [x, r, bn.weight, bn.bias]

    def step() -> tuple[Tensor, ...]:
        return torch.autograd.grad(bn(x, residual=r, activation="relu"), leaves, grad_out)

    return step


def host_cost(device: torch.device | str = "cpu", *, calls: int = 200, repeats: int = 15) -> list[dict]:
    """Host time of one forward + backward of BN+add+ReLU at HOST_SHAPE, fused vs eager, as the
    function (divco.ops.batch_norm vs F.batch_norm + add + relu) and as the module
    (BranchBatchNorm2d with impl "fused" vs "eager"), interleaved in one run.

    Method: on a CPU the fused op runs its native CPU kernel (divco._C) and eager PyTorch its
    own; at 32 values both kernels take microseconds, so the time is the launch path: argument
    checks, backend choice, the dispatcher, the autograd wrapper, allocation and the running-
    statistics update. Each sample times ``calls`` steps in a row, the four methods interleaved;
    the estimate is the fastest sample (on a shared machine the others carry other processes'
    time, which is no cost of either path). Records: microseconds per step (``us_per_step``,
    fastest; ``median_us_per_step``) and ``ratio_vs_eager`` (this / eager, from the same run)."""
    device = torch.device(device)
    steps = {
        "op_fused": make_block_step("fused", "bn_add_relu", HOST_SHAPE, torch.contiguous_format, device),
        "op_eager": make_block_step("eager", "bn_add_relu", HOST_SHAPE, torch.contiguous_format, device),
        "module_fused": make_module_step("fused", HOST_SHAPE, device),
        "module_eager": make_module_step("eager", HOST_SHAPE, device),
    }

    def batch(step):
        def run() -> None:
            for _ in range(calls):
                step()
        return run

    times = time_interleaved({name: batch(step) for name, step in steps.items()}, repeats, warmup=2)
    per_call = {name: min(samples) / calls for name, samples in times.items()}
    records = []
    for name, seconds in per_call.items():
        level, impl = name.split("_")
        records.append({
            "op": "batch_norm", "measure": "host", "level": level, "impl": impl, "shape": list(HOST_SHAPE),
            "device": device.type, "threads": torch.get_num_threads(), "us_per_step": seconds * 1e6,
            "median_us_per_step": median(times[name]) / calls * 1e6,
            "ratio_vs_eager": seconds / per_call[f"{level}_eager"], "calls": calls, "repeats": repeats,
        })
    return records
