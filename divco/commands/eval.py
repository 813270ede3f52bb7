"""divco eval: test metrics of a training checkpoint (per branch, every ensemble mode)."""

from __future__ import annotations

import json

HELP = "evaluate a checkpoint: per-branch and ensemble accuracy, NLL, ECE, disagreement"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint written by divco train, or a run folder (its best.pt)")
    parser.add_argument("--data", default=None, help="data to test on (default: the checkpoint's training data)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args) -> int:
    from ..train.evaluate_checkpoint import evaluate_checkpoint

    result, description = evaluate_checkpoint(
        args.checkpoint, data=args.data, image_size=args.image_size, test_subset=args.test_subset,
        batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps({**description, **result.to_dict()}))
    else:
        print(result.table(f"{description['checkpoint']}: {description['model']} x{description['branches']} after "
                           f"{description['epochs_done']} epoch(s) on {description['data']}"))
    return 0
