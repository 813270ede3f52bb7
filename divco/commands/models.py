"""divco models: list the model zoo."""

from __future__ import annotations

HELP = "list the registered models"


def add_arguments(parser) -> None:
    parser.add_argument("--family", choices=("cifar", "imagenet"), default=None)


def run(args) -> int:
    from .. import models

    for name in models.list(args.family):
        entry = models.get_entry(name)
        print(f"{name:<22} {entry.family:<9} {entry.description}")
    return 0
