"""Micro-benchmarks of the fused co-training loss: forward + backward of one step.

Compared on the same inputs, in one run (so ratios are meaningful on a noisy machine):

    eager      the torch backend (the readable reference, plain PyTorch ops), eager mode
    compiled   torch.compile of that same reference function
    <backend>  each fused backend available for the device ("cpu" / "cuda" native, "triton")

A step is: logits (a leaf requiring grad) -> cotrain_loss -> loss.backward(). Timing is
medians of repeats after warm-up: on the CPU the implementations are interleaved round-robin
(a noisy machine slows them alike), on CUDA each is timed with CUDA events
(divco.benchmark.measure). ``run`` returns one record (a dict) per case and implementation;
``divco bench`` reports them and bench/bench_ops.py wraps the same steps for pytest-benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from .. import ops
from ..ops import backends
from ..ops.triton_backend import kernels_interpreted
from .measure import median, synchronize, time_cuda, time_interleaved


@dataclass(frozen=True)
class OpCase:
    """One problem size: logits [N, S, K] of ``dtype``, class-index targets; ``weighted``:
    with per-sample weights (sample_weight [N], as CBNN trains)."""

    N: int
    S: int
    K: int
    dtype: torch.dtype = torch.float32
    kind: str = "js"
    weighted: bool = False

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"N{self.N}-S{self.S}-K{self.K}-{dtype}-{self.kind}" + ("-weighted" if self.weighted else "")


#: The sizes of the issue: CIFAR-10/100-like heads, ImageNet-1k, a 32k vocabulary; the
#: CIFAR-100 head again with per-sample weights (their cost, next to the unweighted case).
CASES = (OpCase(256, 4, 10), OpCase(256, 4, 100), OpCase(256, 4, 100, weighted=True), OpCase(256, 2, 1000),
         OpCase(64, 2, 32000))

#: Tiny sizes, where a step costs what the host spends per call (argument checks, dispatch,
#: allocation, autograd bookkeeping) and almost no arithmetic: a fused backend must cost no
#: more than the eager composite here (its speedup_vs_eager >= 1, measured in the same run).
HOST_CASES = (OpCase(1, 2, 2), OpCase(8, 2, 10))


def make_inputs(case: OpCase, device: torch.device | str, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(case.N, case.S, case.K, generator=g) * 3).to(device=device, dtype=case.dtype)
    target = torch.randint(0, case.K, (case.N,), generator=g).to(device)
    return logits.requires_grad_(), target


def implementations(device: torch.device | str, compiled: bool = True) -> list[str]:
    """eager, compiled (optional), then every fused backend worth timing on ``device``.

    Triton on the CPU runs in its interpreter (a correctness tool, ~35 ms per row): not timed.
    """
    device = torch.device(device)
    names = ["eager"] + (["compiled"] if compiled else [])
    for backend in backends.available_backends(device):
        if backend == "torch" or (backend == "triton" and kernels_interpreted()):
            continue
        names.append(backend)
    return names


def make_step(
    impl: str,
    case: OpCase,
    device: torch.device | str,
    weight: float = 0.5,
    inputs: Optional[tuple[Tensor, Tensor]] = None,
) -> Callable[[], None]:
    """A zero-argument forward+backward step of ``impl`` on ``inputs`` (default: fresh ones of
    ``case``); each call leaves dloss/dlogits in ``logits.grad``."""
    logits, target = inputs if inputs is not None else make_inputs(case, device)
    weight_tensor = torch.tensor(weight, device=logits.device)
    sample_weight = None
    if case.weighted:  # mean 1, as a boosting method gives them
        sample_weight = (torch.rand(case.N, generator=torch.Generator().manual_seed(1)) * 2).to(logits.device)

    def reference(z: Tensor, y: Tensor, w: Tensor) -> Tensor:
        return ops.cotrain_loss(z, y, weight=w, kind=case.kind, sample_weight=sample_weight, backend="torch").loss

    if impl == "eager":
        loss_fn = reference
    elif impl == "compiled":
        loss_fn = torch.compile(reference, fullgraph=True, dynamic=False)
    else:

        def loss_fn(z: Tensor, y: Tensor, w: Tensor) -> Tensor:
            return ops.cotrain_loss(z, y, weight=w, kind=case.kind, sample_weight=sample_weight, backend=impl).loss

    def step() -> None:
        logits.grad = None
        loss_fn(logits, target, weight_tensor).backward()

    return step


def run(
    device: torch.device | str = "cpu",
    cases: Iterable[OpCase] = CASES + HOST_CASES,
    *,
    repeats: Optional[int] = None,
    warmup: int = 3,
    compiled: bool = True,
    impls: Optional[list[str]] = None,
) -> list[dict]:
    """Time every implementation on every case; one record per (case, implementation).

    Records: op, N, S, K, dtype, kind, weighted, device, threads (CPU intra-op threads), impl, median_ms,
    speedup_vs_eager (eager
    median / this median, both from this run), repeats, times_s (every repeat, seconds).
    ``repeats`` defaults to 30 on CUDA and to a count that keeps each CPU case near a second.
    """
    device = torch.device(device)
    impls = impls or implementations(device, compiled=compiled)
    records = []
    for case in cases:
        steps = {impl: make_step(impl, case, device) for impl in impls}
        n = repeats or _default_repeats(steps.get("eager"), device)
        if device.type == "cuda":
            times = {name: time_cuda(step, n, warmup=warmup) for name, step in steps.items()}
        else:
            times = time_interleaved(steps, n, warmup=warmup)
        eager = median(times["eager"]) if "eager" in times else None
        for impl, samples in times.items():
            mid = median(samples)
            records.append(
                {
                    "op": "cotrain_loss",
                    "N": case.N,
                    "S": case.S,
                    "K": case.K,
                    "dtype": str(case.dtype).removeprefix("torch."),
                    "kind": case.kind,
                    "weighted": case.weighted,
                    "device": device.type,
                    "threads": torch.get_num_threads() if device.type == "cpu" else None,
                    "impl": impl,
                    "median_ms": mid * 1e3,
                    "speedup_vs_eager": (eager / mid) if eager else None,
                    "repeats": n,
                    "times_s": samples,
                }
            )
    return records


def _default_repeats(eager_step: Optional[Callable[[], None]], device: torch.device) -> int:
    if device.type == "cuda" or eager_step is None:
        return 30
    import time

    eager_step()  # warm
    start = time.perf_counter()
    eager_step()
    seconds = time.perf_counter() - start
    synchronize(device)
    return int(min(200, max(10, 1.0 / max(seconds, 1e-6))))


def format_table(records: list[dict]) -> str:
    """A plain-text table of ``run``'s records."""
    lines = [f"{'case':<28} {'impl':<10} {'median ms':>10} {'vs eager':>9}"]
    for r in records:
        case = f"N{r['N']} S{r['S']} K{r['K']} {r['dtype']} {r['kind']}" + (" weighted" if r["weighted"] else "")
        speedup = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
        lines.append(f"{case:<28} {r['impl']:<10} {r['median_ms']:>10.3f} {speedup:>9}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m divco.benchmark.ops [cpu|cuda] [host]
    import sys

    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    host_only = "host" in sys.argv[2:]  # the tiny sizes only: the per-call host cost
    print(format_table(run(device, HOST_CASES if host_only else CASES + HOST_CASES, compiled=not host_only)))
