"""How should S branches run on a CPU?  Forward+backward time of one divided network
computed several ways, against the official code's loop over S separate models and
against the undivided network.

    python bench/cpu_conv_strategies.py                      # WRN-16-8, S=4, batch 64
    python bench/cpu_conv_strategies.py --model resnet110 --branches 2 --batch-size 128

Methods (all compute the same function):
  batched/grouped   all branches at once, one grouped convolution per layer
  batched/split     all branches at once, S dense convolutions on channel slices
  per_branch        one branch after another on slices of the shared weights
  auto              what divco does by default (per_branch on CPUs)
  loop              S separate standard models, one after another (the official code)
  undivided         the large network (S=1) with about the same parameters and FLOPs
each in NCHW and channels_last.  Repeats are interleaved (this measures a noisy
machine fairly) and the median is reported, with ratios against the loop in the same
memory format.  A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import divco
from divco.nn import set_conv_impl


def step(models, x, target):
    for model in models:
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), target.repeat_interleave(logits.shape[1]))
        loss.backward()


def build_methods(name: str, branches: int, num_classes: int):
    divided = divco.models.create(name, num_classes=num_classes, branches=branches)
    methods = {}
    for fmt in ("nchw", "channels_last"):
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format

        def prepare(m, mf=mf):
            return m.to(memory_format=mf)

        for label, execution, impl in [
            ("batched/grouped", "batched", "grouped"),
            ("batched/split", "batched", "split"),
            ("per_branch", "per_branch", "auto"),
            ("auto", "auto", "auto"),
        ]:
            m = prepare(divco.models.create(name, num_classes=num_classes, branches=branches))
            m.load_state_dict(divided.state_dict())
            m.execution = execution
            set_conv_impl(m, impl)
            methods[(label, fmt)] = [m]
        methods[("loop", fmt)] = [prepare(m) for m in divco.unstack(divided)]
        methods[("undivided", fmt)] = [prepare(divco.models.create(name, num_classes=num_classes, branches=1))]
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wide_resnet16_8")
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    methods = build_methods(args.model, args.branches, args.num_classes)
    x = torch.randn(args.batch_size, 3, 32, 32)
    inputs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    target = torch.randint(0, args.num_classes, (args.batch_size,))
    for key, models in methods.items():  # warm-up: oneDNN primitive caches, allocator
        step(models, inputs[key[1]], target)
    times = {key: [] for key in methods}
    for _ in range(args.repeats):
        for key, models in methods.items():
            for m in models:
                m.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(models, inputs[key[1]], target)
            times[key].append(time.perf_counter() - start)

    print(f"# {args.model}, S={args.branches}, batch {args.batch_size}, forward+backward, "
          f"median of {args.repeats} interleaved repeats")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'method':<18} {'format':<14} {'seconds':>8} {'vs loop':>8}")
    for (label, fmt), ts in times.items():
        median = statistics.median(ts)
        loop = statistics.median(times[("loop", fmt)])
        print(f"{label:<18} {fmt:<14} {median:8.3f} {loop / median:7.2f}x")


if __name__ == "__main__":
    main()
