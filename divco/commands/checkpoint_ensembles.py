"""divco checkpoint-ensembles: the CBNN paper's comparison (single, snapshot, fge, swa, cbnn) at one budget."""

from __future__ import annotations

import argparse
import json

HELP = ("train one network as a single model and as each checkpoint ensemble (snapshot, fge, swa, cbnn) with the "
        "same data, epochs, batch and seed; write the table (every member's test accuracy, the ensemble's accuracy, "
        "NLL and ECE) and a plot")

TABLE_NAME, JSON_NAME, PLOT_NAME = "checkpoint-ensembles.md", "checkpoint-ensembles.json", "checkpoint-ensembles.png"


def add_arguments(parser) -> None:
    from ..train.ensemble_comparison import COMPARED
    from ._train_options import add_train_options

    add_train_options(parser, overrides={
        "method": dict(dest="method", nargs="+", default=list(COMPARED), choices=tuple(COMPARED),
                       metavar="RUN", help=f"the runs compared (default: {' '.join(COMPARED)}); single is "
                                           f"--method cotrain with one network"),
        "branches": dict(help=argparse.SUPPRESS, default=1)})
    parser.add_argument("--out", required=True, metavar="DIR",
                        help=f"folder of the runs (DIR/single, DIR/snapshot, ...) and of {TABLE_NAME}, {JSON_NAME} "
                             f"and {PLOT_NAME}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.epilog = ("Every run gets the options given here; a method's own options (--checkpoints, --fge-*, "
                     "--swa-*, --cbnn-*) go to the runs of the methods that take them. Each run resumes where it "
                     "stopped: the same command again continues unfinished runs and reuses finished ones.")


def run(args) -> int:
    from pathlib import Path

    from ..io import atomic_write_text
    from ..train import list_checkpoints, methods, train
    from ..train.ensemble_comparison import (COMPARED, SINGLE, comparison_table, draw, members_row, single_row,
                                             with_single_at_member_epochs)
    from ..train.run_log import write_json
    from ..train.runtime import option_spelling
    from ._train_options import cli_spelling, exit_code, train_config_from_args

    compared = list(args.method)
    if len(set(compared)) != len(compared):
        raise ValueError(f"--method lists a run twice: {compared}")
    if args.branches != 1:
        raise ValueError(f"checkpoint-ensembles compares ONE network with its checkpoint ensembles: --branches must "
                         f"be 1, got {args.branches}")
    own = methods.method_options()  # a method's own options: only for the runs of the methods that take them
    out = Path(args.out)
    rows = []
    for name in compared:
        method = COMPARED[name]
        folder = out / name
        unset = {option: None for option, owners in own.items() if method not in owners}
        config = train_config_from_args(args, out=str(folder), method=method, branches=1,
                                        resume=bool(list_checkpoints(folder)), **unset)
        with option_spelling(cli_spelling):  # errors name options as typed here
            result = train(config)
        if not result.completed:
            return exit_code(result.interrupted)
        rows.append(single_row(folder) if name == SINGLE else
                    members_row(name, folder, device=args.device, cache_dir=args.cache_dir))
    rows = with_single_at_member_epochs(rows)
    title = (f"{args.model} on {args.data}, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed} "
             f"(test accuracy of each run's final ensemble; members at their epochs against the single model's)")
    table = comparison_table(rows, title)
    write_json(out / JSON_NAME, {"title": title, "rows": rows})
    atomic_write_text(out / TABLE_NAME, table)
    drawn = draw(rows, out / PLOT_NAME)
    print(json.dumps({"title": title, "rows": rows}) if args.json else table.rstrip("\n"))
    if not drawn:
        print(f"{PLOT_NAME} not drawn: matplotlib is not installed")
    return 0
