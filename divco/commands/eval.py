"""divco eval: test metrics of a training checkpoint (per branch, every ensemble mode)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = ("evaluate a checkpoint: per-branch and ensemble accuracy, NLL, ECE, adaptive ECE, Brier, AURC, "
        "disagreement, temperature scaling")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint written by divco train, or a run folder (its best.pt; for a snapshot or "
                             "cbnn run: every member checkpoint and their weighted ensemble)")
    parser.add_argument("--data", default=None, help="data to test on (default: the checkpoint's training data)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-temperature", dest="temperature", action="store_false",
                        help="skip post-hoc temperature scaling (by default T is fitted on the run's validation "
                             "split and the metrics are reported on the test images; for a run without one, T is "
                             "fitted on a seeded half of the test images and reported on the other half)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--devices", default=None, metavar="DEV,DEV",
                        help="run the branches split over these devices in one process (e.g. cuda:0,cuda:1; the "
                             "number of devices must divide S); the same metrics")
    parser.add_argument("--branch-parallel", action="store_true",
                        help="under torchrun: S/WORLD_SIZE branches per process, their logits all-gathered (rank 0 "
                             "prints); the same metrics")


def run(args) -> int:
    from ..train.evaluate_checkpoint import evaluate_checkpoint, evaluate_members, members_table
    from ..train.evaluation import temperature_table
    from ..train.members import is_members_run

    if is_members_run(args.checkpoint):  # a snapshot/cbnn run: its members and their weighted ensemble
        report = evaluate_members(args.checkpoint, data=args.data, image_size=args.image_size,
                                  test_subset=args.test_subset, batch_size=args.batch_size, device=args.device,
                                  cache_dir=args.cache_dir)
        print(json.dumps(report) if args.json else members_table(report))
        return 0

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    if args.branch_parallel:  # every process evaluates its branches; rank 0 prints
        from ..train.distributed import DistributedContext
        from ..train.runtime import resolve_device

        processes = DistributedContext.from_env(resolve_device(args.device).type)
        try:
            device = str(resolve_device(args.device, processes.local_rank))
            result, description = evaluate_checkpoint(
                args.checkpoint, data=args.data, image_size=args.image_size, test_subset=args.test_subset,
                batch_size=args.batch_size, device=device, cache_dir=args.cache_dir, temperature=args.temperature,
                branch_parallel=True)
        finally:
            processes.close()
        if not processes.is_main:
            return 0
    else:
        result, description = evaluate_checkpoint(
            args.checkpoint, data=args.data, image_size=args.image_size, test_subset=args.test_subset,
            batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir,
            temperature=args.temperature, devices=devices)
    if Path(args.checkpoint).is_dir():  # say which checkpoint of the run folder is evaluated, and why
        print(f"divco eval: {chosen_checkpoint(description)}", file=sys.stderr)
    if args.json:
        print(json.dumps({**description, **result.to_dict()}))
    else:
        print(result.table(f"{description['checkpoint']}: {description['model']} x{description['branches']} after "
                           f"{description['epochs_done']} epoch(s) on {description['data']}"))
        if args.temperature:
            print(temperature_table(description["temperature_scaling"]))
    return 0


def chosen_checkpoint(description: dict) -> str:
    """One line: the checkpoint of a run folder that is evaluated and why it is the one."""
    best = description.get("best")
    if best is None:
        return f"evaluating {description['checkpoint']} (epoch {description['epochs_done']}: the run's newest checkpoint)"
    metric = best.get("selected_on", "test_ensemble_acc")
    return (f"evaluating {description['checkpoint']} (epoch {best['epoch']}: the best {metric}, "
            f"{100 * best[metric]:.2f} %)")
