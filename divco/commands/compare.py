"""divco compare: train the same network undivided and divided (S = 1, 4, ...) and tabulate the results."""

from __future__ import annotations

import json

HELP = "train one network at several S (default 1 and 4) with the same recipe and print a comparison table"


def add_arguments(parser) -> None:
    from ._train_options import add_train_options

    add_train_options(parser, several_branches=True)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder of the runs (DIR/S1, DIR/S4, ...) and of compare.md / compare.json")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.epilog = ("Each run resumes where it stopped: running the same command again continues unfinished runs "
                     "and reuses finished ones.")


def run(args) -> int:
    from pathlib import Path

    from ..train import list_checkpoints, train
    from ..train.comparison import comparison_rows, comparison_table
    from ..train.run_log import write_json
    from ..train.runtime import option_spelling
    from ._train_options import cli_spelling, exit_code, train_config_from_args

    if len(set(args.branches)) != len(args.branches):
        raise ValueError(f"--branches lists a value twice: {args.branches}")
    out = Path(args.out)
    results = []
    for S in args.branches:
        folder = out / f"S{S}"  # resumed where it holds a checkpoint, else started
        config = train_config_from_args(args, out=str(folder), branches=S, resume=bool(list_checkpoints(folder)))
        with option_spelling(cli_spelling):  # errors name options as typed here: --resume, not resume=True
            result = train(config)
        if not result.completed:
            return exit_code(result.interrupted)
        results.append((config, result))
    rows = comparison_rows(results)
    table = comparison_table(rows, results[0][0], results[0][1])
    write_json(out / "compare.json", rows)
    from ..io import atomic_write_text

    atomic_write_text(out / "compare.md", table + "\n")
    print(json.dumps(rows) if args.json else table)
    return 0
