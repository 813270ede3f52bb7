"""Timing and peak memory of benchmark steps, fairly.

- CPU: the steps of all methods of one comparison are timed round-robin (every
  repeat runs each method once, in an order rotated between repeats), so a noisy
  machine slows all methods alike; medians of the repeats.
- CUDA: one method at a time, CUDA events around every step, medians.
- Warm-up steps are never timed.

Peak memory is the largest amount of tensor memory allocated during a step,
including everything the step keeps (parameters, gradients, optimizer state,
buffers, inputs).  On CUDA it is the caching allocator's peak from the method's
construction on (``torch.cuda.max_memory_allocated``); on the CPU it is the
step's kept tensors plus the peak of the allocations that torch.profiler records
during one extra step (:func:`cpu_peak_memory`).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor


def storage_bytes(tensors: Iterable[Optional[Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """CPU: seconds of every step of every method, methods interleaved across repeats."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def time_cuda(step: Callable[[], None], repeats: int, warmup: int = 3) -> list[float]:
    """CUDA: seconds of each of ``repeats`` steps, measured with CUDA events."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        step()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1000.0 for start, end in events]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def cpu_peak_memory(step: Callable[[], None], kept: Callable[[], list[Tensor]]) -> int:
    """Peak bytes of CPU tensors during one ``step``: what it keeps plus its transient peak.

    torch.profiler records every allocation and free during the step (memory
    events); their running sum's maximum is the step's transient peak.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    baseline = storage_bytes(kept())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == DeviceType.CPU:
            running += event.nbytes()
            peak = max(peak, running)
    return baseline + peak


def profile_table(step: Callable[[], None], device: torch.device, row_limit: int = 15) -> str:
    """torch.profiler's table of the ops where one ``step`` spends its time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
