"""divco summary: parameters and MACs of a model, per branch and in total."""

from __future__ import annotations

import json

HELP = "print parameters and multiply-accumulates of a model, per branch and in total"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a name from `divco models`")
    parser.add_argument("--branches", type=int, default=1, help="S, the number of small networks")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                        help="default: the model family's (3 32 32 for CIFAR, 3 224 224 for ImageNet)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from .. import models
    from ..summary import summary

    model = models.create(args.model, num_classes=args.num_classes, branches=args.branches)
    size = args.input_size or models.get_entry(args.model).input_size
    result = summary(model, size, name=args.model)
    print(json.dumps(result.as_dict()) if args.json else result)
    return 0
