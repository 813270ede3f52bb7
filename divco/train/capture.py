"""Whole-step capture: the training step as one compiled graph or one CUDA graph.

``TrainStep(capture=...)`` (``TrainConfig.capture``, ``--capture``) picks one of
:data:`CAPTURE_MODES`:

``"none"``          eager PyTorch.
``"compile"``       ``torch.compile`` of forward + loss; backward and the optimiser step eager.
``"compile-step"``  forward, loss, backward, optimiser step and the metric sums in ONE
                    ``torch.compile`` graph (no graph break): dynamo traces the backward as
                    ``torch.autograd.grad`` (``torch._dynamo.config.trace_autograd_ops``; a torch
                    without it is refused) and the optimiser's own step function without the
                    graph break ``Optimizer.step`` inserts around it.
``"cuda-graph"``    the eager step captured once into a ``torch.cuda.CUDAGraph`` and replayed:
                    no Python and no kernel launches per step.

Both captured modes take their first step(s) eagerly: those allocate the gradients and the
optimiser state (momentum buffers, Adam's moments and step counters) before capture, and show
which parameters get no gradient.  They are real training steps, not extra ones.  The learning
rate the schedule writes as a Python float is copied into a 0-dim device tensor before every
step (``fill_`` of a host number: a launch, no synchronisation), so a changing rate neither
retraces the compiled step nor goes stale in the CUDA graph.  Nothing in a captured step reads
the device from the host; the metric sums and their step counter stay on the device
(:class:`~divco.train.step.RunningMetrics`).

Limits (each refused with a clear error, never silently run differently): float16 with a
GradScaler (its overflow check reads the host), DistributedDataParallel (its gradient hooks
need ``backward()``), and optimisers other than SGD (both modes) and Adam/AdamW (cuda-graph,
with ``capturable=True``).  A CUDA graph also needs every batch of the same shape (the engine
drops the last incomplete batch) and returns outputs that the next step overwrites.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .. import ops
from .runtime import unwrap_model

if TYPE_CHECKING:
    from .step import TrainStep

#: How a TrainStep is captured (TrainConfig.capture).
CAPTURE_MODES = ("none", "compile", "compile-step", "cuda-graph")

#: The torch.compile backend of "compile-step" (tests use "aot_eager": the same graph capture,
#: without inductor's code generation, which takes minutes on a small CPU).
COMPILE_BACKEND = "inductor"

#: Eager steps before the CUDA graph is captured (on a side stream, as torch.cuda.graphs asks).
CUDA_GRAPH_WARMUP_STEPS = 3


def check_capture(capture: str, compile: bool = False) -> str:
    """The capture mode of ``capture`` and the older ``compile`` flag (True means "compile")."""
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
    if compile and capture not in ("none", "compile"):
        raise ValueError(f"compile=True (forward + loss compiled) contradicts capture={capture!r}; "
                         f"give one of them")
    return "compile" if compile else capture


def traces_autograd() -> bool:
    """Whether this torch's dynamo traces ``backward``/``autograd.grad`` into the graph."""
    return getattr(torch._dynamo.config, "trace_autograd_ops", None) is not None


def whole_step_capture(step: "TrainStep", capture: str):
    """The object that runs ``step``'s whole step for ``capture``, or None (eager or "compile")."""
    if capture not in ("compile-step", "cuda-graph"):
        return None
    if step.scaler is not None:
        raise ValueError(f"capture={capture!r} cannot run float16 with a GradScaler (its overflow check reads "
                         f"the host every step); use bfloat16 or float32, or capture='compile'")
    if hasattr(step.model, "module"):
        raise ValueError(f"capture={capture!r} does not run DistributedDataParallel (its gradient hooks need "
                         f"backward()); use capture='compile' or 'none' with several processes")
    if capture == "compile-step":
        return CompiledWholeStep(step)
    return CudaGraphStep(step)


class LearningRates:
    """The parameter groups' learning rates as 0-dim device tensors, refreshed from the schedule's floats."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        self.tensors = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)
                        for g in optimizer.param_groups]
        self._floats: list = []

    def load(self) -> None:
        """Copy the current rates into the tensors and put the tensors into the groups."""
        self._floats = [g["lr"] for g in self.optimizer.param_groups]
        for group, rate, value in zip(self.optimizer.param_groups, self.tensors, self._floats):
            if value is not rate:
                rate.fill_(float(value))  # a host number: no device read
            group["lr"] = rate

    def unload(self) -> None:
        """Give the groups their floats back (checkpoints and the schedule see what they wrote)."""
        for group, value in zip(self.optimizer.param_groups, self._floats):
            group["lr"] = value


def _parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _detached(out: ops.CotrainLoss) -> ops.CotrainLoss:
    return type(out)(*[t.detach() for t in out])


def _buffers(step: "TrainStep") -> list[Tensor]:
    return list(unwrap_model(step.model).buffers()) if step.skip_nonfinite else []


class CompiledWholeStep:
    """The whole step of a TrainStep in one ``torch.compile`` graph ("compile-step")."""

    def __init__(self, step: "TrainStep") -> None:
        if not traces_autograd():
            raise ValueError(f"capture='compile-step' needs a torch whose dynamo traces autograd "
                             f"(torch._dynamo.config.trace_autograd_ops); torch {torch.__version__} has none: "
                             f"use capture='compile' or, on CUDA, 'cuda-graph'")
        if type(step.optimizer) is not torch.optim.SGD:
            raise ValueError(f"capture='compile-step' runs torch.optim.SGD (with its rate as a tensor), got "
                             f"{type(step.optimizer).__name__}")
        self.step = step
        self.lrs = LearningRates(step.optimizer, step.cot_weight.device)
        # the optimiser's step function without Optimizer.step's graph breaks (its no_grad is ours)
        self._optimizer_step = functools.partial(inspect.unwrap(type(step.optimizer).step), step.optimizer)
        self._with_grad: Optional[list[Tensor]] = None
        self._compiled = torch.compile(self.whole_step, backend=COMPILE_BACKEND)

    def __call__(self, images: Tensor, targets: Tensor, sample_weight: Optional[Tensor] = None) -> ops.CotrainLoss:
        step = self.step
        if self._with_grad is None:  # the first step eagerly: gradients and optimiser state exist after it
            out, bad = step.update(images, targets, sample_weight)
            step.metrics.add(out, images.shape[0], bad=bad, skipped=bad is not None)
            self._with_grad = [p for p in _parameters(step.optimizer) if p.grad is not None]
        else:
            self.lrs.load()
            try:
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    out = self._compiled(images, targets, sample_weight)  # the metric sums included
            finally:
                self.lrs.unload()
            step.metrics.count_images(images.shape[0])
        if step.scheduler is not None:
            step.scheduler.step()
        return out

    def whole_step(self, images: Tensor, targets: Tensor, sample_weight: Optional[Tensor]):
        """Forward, loss, gradients (written into the existing ``.grad`` tensors), optimiser step, metric sums."""
        step = self.step
        buffers = _buffers(step)
        buffers_before = [b.clone() for b in buffers]
        out = step.forward_loss(images, targets, sample_weight)
        loss = out.loss
        result = _detached(out)
        grads = torch.autograd.grad(loss, self._with_grad)
        del loss, out  # autograd.grad consumed their graph: nothing may hold it past the step
        with torch.no_grad():
            for p, g in zip(self._with_grad, grads):
                p.grad.copy_(g)
            bad = None
            if step.skip_nonfinite:
                bad = step._step_unless_nonfinite(result.loss, list(zip(buffers, buffers_before)),
                                                  self._optimizer_step)
            else:
                self._optimizer_step()
            step.metrics.accumulate(result, images.shape[0], bad=bad, skipped=bad is not None)
        return result


def sgd_step_(optimizer: torch.optim.SGD, rates: list[Tensor]) -> None:
    """torch.optim.SGD's update with each group's rate a device tensor (a float would be frozen into a graph).

    The same arithmetic as torch's foreach SGD (weight decay, momentum, dampening, Nesterov,
    maximize); the momentum buffers must exist (the eager warm-up steps create them).
    """
    with torch.no_grad():
        for group, lr in zip(optimizer.param_groups, rates):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            momentum = group["momentum"]
            if momentum != 0:
                bufs = [optimizer.state[p].get("momentum_buffer") for p in params]
                if any(b is None for b in bufs):
                    raise ValueError("sgd_step_ needs the momentum buffers of every parameter with a gradient; "
                                     "take an eager step first")
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
                grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
            torch._foreach_add_(params, torch._foreach_mul(grads, -lr))


class CudaGraphStep:
    """The whole step replayed as one CUDA graph ("cuda-graph").

    Steps 1..CUDA_GRAPH_WARMUP_STEPS run eagerly on a side stream (they allocate the gradients,
    the optimiser state and cuDNN's workspaces); the next step copies its batch into static input
    buffers, is captured (forward, loss, backward, optimiser step with tensor rates, metric sums)
    and replayed; every later step copies its batch into those buffers and replays the graph.
    """

    def __init__(self, step: "TrainStep", warmup_steps: int = CUDA_GRAPH_WARMUP_STEPS) -> None:
        device = step.cot_weight.device
        if device.type != "cuda":
            raise ValueError(f"capture='cuda-graph' needs a CUDA device, got {device}")
        optimizer = step.optimizer
        if type(optimizer) is torch.optim.SGD:
            self._optimizer_step = lambda: sgd_step_(optimizer, self.lrs.tensors)
        elif type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
            for group in optimizer.param_groups:  # device step counters, created in the first step
                group["capturable"] = True
            self._optimizer_step = optimizer.step
        else:
            raise ValueError(f"capture='cuda-graph' runs torch.optim.SGD, Adam or AdamW, got "
                             f"{type(optimizer).__name__}")
        step.autocast_cache = False  # cached casts would be graph-private memory read outside the graph
        self.step = step
        self.device = device
        self.warmup_steps = warmup_steps
        self.lrs = LearningRates(optimizer, device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.steps_taken = 0
        self._side_stream: Optional[torch.cuda.Stream] = None
        self._static: Optional[tuple] = None
        self._static_out: Optional[ops.CotrainLoss] = None

    def __call__(self, images: Tensor, targets: Tensor, sample_weight: Optional[Tensor] = None) -> ops.CotrainLoss:
        step = self.step
        if self.graph is None and self.steps_taken < self.warmup_steps:
            out = self._warmup_step(images, targets, sample_weight)
        else:
            if self.graph is None:
                self._capture(images, targets, sample_weight)
            self._load_inputs(images, targets, sample_weight)
            self.lrs.load()
            self.graph.replay()
            self.lrs.unload()
            step.metrics.count_images(images.shape[0])
            out = self._static_out
        if step.scheduler is not None:
            step.scheduler.step()
        self.steps_taken += 1
        return out

    def _warmup_step(self, images, targets, sample_weight) -> ops.CotrainLoss:
        step = self.step
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._side_stream.wait_stream(current)
        with torch.cuda.stream(self._side_stream):
            out, bad = step.update(images, targets, sample_weight)
            step.metrics.add(out, images.shape[0], bad=bad, skipped=bad is not None)
        current.wait_stream(self._side_stream)
        return out

    def _capture(self, images, targets, sample_weight) -> None:
        step = self.step
        self._static = (images.clone(), targets.clone(), None if sample_weight is None else sample_weight.clone())
        self.lrs.load()  # the graph reads the rate tensors (Adam: from the groups; SGD: from sgd_step_)
        try:
            step.optimizer.zero_grad(set_to_none=True)  # gradients come from the graph's pool
            torch.cuda.synchronize(self.device)  # once, before capture: not a step's synchronisation
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                out, bad = step.update(*self._static, optimizer_step=self._optimizer_step)
                out = _detached(out)
                step.metrics.accumulate(out, images.shape[0], bad=bad, skipped=bad is not None)
        finally:
            self.lrs.unload()
        self._static_out = out

    def _load_inputs(self, images, targets, sample_weight) -> None:
        static_images, static_targets, static_weight = self._static
        given = (images, targets, sample_weight)
        for name, static, tensor in zip(("images", "targets", "sample_weight"), self._static, given):
            if (static is None) != (tensor is None) or (tensor is not None and tensor.shape != static.shape):
                raise ValueError(f"capture='cuda-graph' replays a graph captured for {name} of shape "
                                 f"{None if static is None else tuple(static.shape)}, got "
                                 f"{None if tensor is None else tuple(tensor.shape)} (every batch must have "
                                 f"the shape of the captured one)")
        static_images.copy_(images, non_blocking=True)
        static_targets.copy_(targets, non_blocking=True)
        if static_weight is not None:
            static_weight.copy_(sample_weight, non_blocking=True)
