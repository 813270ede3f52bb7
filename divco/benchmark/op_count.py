"""Ops and kernel launches of one training step, fused vs eager BatchNorm.

    python -m divco.benchmark.op_count [cpu|triton] [model:S ...]

A step is forward, co-training loss, backward and an SGD step (foreach) of a divided model on
a tiny batch: what the host dispatches per step does not depend on the image size. ``ops``
counts every operator call that reaches the dispatcher below autograd (TorchDispatchMode: ATen
ops and divco's custom operators, each once, not what runs inside them); ``launches`` counts
the Triton kernel launches (backend "triton"; the interpreter on a CPU). The eager model runs
F.batch_norm + add + ReLU; the fused one divco.ops.batch_norm on ``backend``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: (model, branches) pairs the report counts by default.
MODELS = (("wide_resnet16_1", 2), ("wide_resnet28_10", 4))


class OpCounter(TorchDispatchMode):
    """Counts each operator call (by overload name) that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_triton_launches():
    """Yields a Counter of Triton kernel launches by kernel name (interpreted or compiled)."""
    counts: collections.Counter = collections.Counter()
    patched = []
    try:
        from triton.runtime import interpreter, jit
    except ImportError:  # no Triton: nothing launches
        yield counts
        return
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, __original=original, **kwargs):
            counts[getattr(self, "__name__", None) or self.fn.__name__] += 1
            return __original(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, original))
    try:
        yield counts
    finally:
        for cls, original in patched:
            cls.run = original


def make_step(model_name: str, branches: int, impl: str, backend: str | None):
    """One TrainStep-like callable: forward, loss, backward, SGD step on a [2, 3, 8, 8] batch."""
    from .. import ops
    from ..models import create
    from ..nn import set_norm_impl

    torch.manual_seed(0)
    model = set_norm_impl(create(model_name, num_classes=10, branches=branches), impl).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    images, targets = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    weight = torch.tensor(0.5)
    previous = os.environ.get("DIVCO_BACKEND")

    def step() -> None:
        if backend is not None:
            os.environ["DIVCO_BACKEND"] = backend
        try:
            loss = ops.cotrain_loss(model(images), targets, weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.loss.backward()
            optimizer.step()
        finally:
            if backend is not None:
                if previous is None:
                    os.environ.pop("DIVCO_BACKEND", None)
                else:
                    os.environ["DIVCO_BACKEND"] = previous

    return step


def count_step(model_name: str, branches: int, impl: str, backend: str | None = None) -> dict:
    """Ops and Triton launches of the second step (the first creates the optimiser state)."""
    step = make_step(model_name, branches, impl, backend)
    step()
    with count_triton_launches() as launches, OpCounter() as counter:
        step()
    return {"model": model_name, "S": branches, "impl": impl, "backend": backend,
            "ops": sum(counter.counts.values()), "launches": sum(launches.values()),
            "by_op": dict(counter.counts.most_common()), "by_kernel": dict(launches)}


def main(argv: list[str]) -> None:
    backend = argv[0] if argv else "cpu"
    pairs = [(name, int(s)) for name, s in (a.split(":") for a in argv[1:])] or list(MODELS)
    for name, S in pairs:
        eager = count_step(name, S, "eager")
        fused = count_step(name, S, "fused", backend)
        print(f"{name} S={S}: eager {eager['ops']} ops; fused ({backend}) {fused['ops']} ops, "
              f"{fused['launches']} Triton launches")
        batch_norm_ops = {k: v for k, v in fused["by_op"].items() if "batch_norm" in k or "divco" in k}
        print("   fused divco/bn ops:", batch_norm_ops, "kernels:", fused["by_kernel"])
        diff = collections.Counter(fused["by_op"])
        diff.subtract(eager["by_op"])
        print("   fused - eager:", {k: v for k, v in diff.most_common() if v})


if __name__ == "__main__":
    main(sys.argv[1:])
