"""How one benchmark step runs: optimizer, autocast, torch.compile, CUDA graphs.

A training step is forward, loss, backward and an SGD step (the recipe's
optimizer: momentum 0.9, Nesterov, weight decay), identical for every method, so
that the methods differ only in how they run the network and the loss.  It is
kept minimal on purpose (no data augmentation, no metrics): the benchmark times
the network, the loss and the update, which is where the methods differ.

``Variant`` says how the step is executed; :func:`make_train_step` and
:func:`make_infer_step` return a zero-argument callable that runs one step on
static inputs (what CUDA-graph replay needs, and what the timers call).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .methods import Method

#: Warm-up iterations on a side stream before a CUDA graph is captured (the
#: optimizer's momentum buffers, cuDNN's algorithm choice and compilation happen there).
GRAPH_WARMUP_STEPS = 3


@dataclass(frozen=True)
class Variant:
    """How a step executes."""

    amp_dtype: Optional[torch.dtype] = None  # autocast dtype; None = float32
    compile: bool = False  # torch.compile of the forward (+ loss) function
    cuda_graphs: bool = False  # capture the whole step in one CUDA graph, replay it

    @property
    def dtype_name(self) -> str:
        return "float32" if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")

    @property
    def label(self) -> str:
        parts = [self.dtype_name]
        if self.compile:
            parts.append("compile")
        if self.cuda_graphs:
            parts.append("graphs")
        return "+".join(parts)


def make_optimizer(method: Method) -> torch.optim.Optimizer:
    return torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _autocast(device: torch.device, variant: Variant, capturing: bool = False):
    if variant.amp_dtype is None:
        return contextlib.nullcontext()
    # The autocast weight cache must be off inside a CUDA graph capture: cached casts
    # would be graph-private memory read outside the graph.
    return torch.autocast(device.type, dtype=variant.amp_dtype, cache_enabled=not capturing)


def _capture(run_once: Callable[[bool], None], prepare: Callable[[], None]) -> Callable[[], None]:
    """Warm ``run_once`` up on a side stream, capture it in a CUDA graph, return the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(GRAPH_WARMUP_STEPS):
            prepare()
            run_once(False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    prepare()
    with torch.cuda.graph(graph):
        run_once(True)
    torch.cuda.synchronize()
    return graph.replay


class MethodTrainStep:
    """One training step of ``method`` on fixed ``images``/``target``: call it."""

    def __init__(self, method: Method, images: Tensor, target: Tensor, variant: Variant) -> None:
        device = method.workload.device
        if variant.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        method.train(True)
        self.method = method
        self.images, self.target = images, target
        self.variant = variant
        self.device = device
        self.optimizer = make_optimizer(method)
        self._forward = torch.compile(method.forward_loss) if variant.compile else method.forward_loss
        self._run: Callable[[], None] = self._eager
        if variant.cuda_graphs:
            self._run = _capture(self._once, self._zero_grad)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _once(self, capturing: bool) -> None:
        with _autocast(self.device, self.variant, capturing):
            loss = self._forward(self.images, self.target)
        loss.backward()
        self.optimizer.step()

    def _eager(self) -> None:
        self._zero_grad()
        self._once(False)

    def __call__(self) -> None:
        self._run()

    def state_tensors(self) -> list[Tensor]:
        """Every tensor the step keeps between calls (for the memory accounting)."""
        tensors = list(self.method.parameters()) + self.method.extra_state() + [self.images, self.target]
        for m in self.method.modules():
            tensors += [b for b in m.buffers() if b.device.type != "meta"]
        tensors += [p.grad for p in self.method.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
        return tensors


class MethodInferStep:
    """One inference pass (forward and ensemble, no gradients) on fixed ``images``: call it."""

    def __init__(self, method: Method, images: Tensor, variant: Variant) -> None:
        device = method.workload.device
        if variant.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        method.train(False)
        self.method = method
        self.images = images
        self.variant = variant
        self.device = device
        self._forward = torch.compile(method.forward_infer) if variant.compile else method.forward_infer
        self._run: Callable[[], None] = self._eager
        if variant.cuda_graphs:
            self._run = _capture(self._once, lambda: None)

    def _once(self, capturing: bool) -> None:
        with torch.inference_mode(), _autocast(self.device, self.variant, capturing):
            self._forward(self.images)

    def _eager(self) -> None:
        self._once(False)

    def __call__(self) -> None:
        self._run()

    def state_tensors(self) -> list[Tensor]:
        tensors = list(self.method.parameters()) + self.method.extra_state() + [self.images]
        for m in self.method.modules():
            tensors += [b for b in m.buffers() if b.device.type != "meta"]
        return tensors
