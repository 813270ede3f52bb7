"""divco train: divide-and-co-train a network, resumable, on one process or many (torchrun)."""

from __future__ import annotations

import os
import sys

HELP = "train S branches of a divided network with co-training (checkpoints and metrics.jsonl in --out)"


def add_arguments(parser) -> None:
    from ._train_options import add_train_options

    add_train_options(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: checkpoints, best.pt, metrics.jsonl, config.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest checkpoint (same options required)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved run (model, optimiser groups, schedules, augmentation) as "
                             "JSON and exit without training")
    parser.add_argument("--num-classes", type=int, default=None, metavar="K",
                        help="with --print-config and data not on disk: the class count (default: that of the "
                             "--recipe's dataset)")
    parser.epilog = ("SIGINT/SIGTERM save a checkpoint and stop (exit status 128 + signal); run the same command "
                     "with --resume to continue. Multi-GPU: torchrun --nproc_per_node=N -m divco train ...")


def run(args) -> int:
    from ..train import train
    from ..train.runtime import option_spelling
    from ._train_options import cli_spelling, exit_code, train_config_from_args

    config = train_config_from_args(args, out=args.out, resume=args.resume)
    with option_spelling(cli_spelling):  # errors name options as typed here: --resume, not resume=True
        if args.print_config:  # the run's plan, as the engine would run it
            import json

            from ..train.plan import describe, plan_from_config
            from ..train.run_checks import check_run_options

            check_run_options(config, print_config=True, num_classes=args.num_classes)  # what train refuses
            print(json.dumps(describe(plan_from_config(config, num_classes=args.num_classes)), indent=2))
            return 0
        if args.num_classes is not None:
            raise ValueError("--num-classes is an option of --print-config (a run counts the classes of its data)")
        from ..train.threads import configure_threads

        configure_threads()  # intra-op threads: this process's share of the cores (DIVCO_NUM_THREADS overrides)
        result = train(config)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints the table
    if result.final is not None and result.completed and is_main:
        print(result.final.table(f"{config.model} x{config.branches}, {result.epochs_done} epoch(s): {args.out}"))
        if config.checkpoint_ensemble:  # the members and their weighted ensemble, as divco eval RUN_DIR shows them
            from ..train.evaluate_checkpoint import evaluate_members, members_table

            try:
                print(members_table(evaluate_members(args.out, device=config.device, cache_dir=config.cache_dir,
                                                     batch_size=config.eval_batch_size or max(config.batch_size, 256))))
            except ValueError as error:  # e.g. no member better than chance: the run itself is complete
                print(f"divco train: no ensemble table: {error}", file=sys.stderr)
    return exit_code(result.interrupted)
