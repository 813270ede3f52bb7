"""divco demo: build a divided network, print its summary and run a forward pass."""

from __future__ import annotations

import time

HELP = "build WRN-16-8 divided into S branches, print its summary, run a forward pass"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="wide_resnet16_8")
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)


def run(args) -> int:
    import torch

    from .. import models
    from ..summary import summary

    model = models.create(args.model, num_classes=10, branches=args.branches)
    print(summary(model, (3, 32, 32), name=args.model))
    x = torch.randn(args.batch_size, args.branches, 3, 32, 32)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model.eval()(x)
    print(f"forward of {args.batch_size} images x {args.branches} views -> logits {tuple(logits.shape)} "
          f"in {time.perf_counter() - start:.3f} s")
    return 0
