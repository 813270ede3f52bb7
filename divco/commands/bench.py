"""divco bench: training and inference throughput of divco against the other ways of
running a divided network (the official loop, torch.func vmap, Packed-Ensembles) and
against the undivided network; writes DIR/results.json, results.md and plots."""

from __future__ import annotations

HELP = "benchmark divco against the official loop, vmap, Packed-Ensembles and the undivided network"


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the reduced profile (a minute or so)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for results.json, results.md, plots")
    g = parser.add_argument_group("overrides of the profile")
    g.add_argument("--models", nargs="+", metavar="NAME", help="registered model names")
    g.add_argument("--branches", nargs="+", type=int, metavar="S", help="numbers of branches")
    g.add_argument("--batch-size", type=int, metavar="N", help="training batch size")
    g.add_argument("--infer-batches", nargs="+", type=int, metavar="N", help="inference batch sizes")
    g.add_argument("--image-size", type=int, metavar="PX", help="square input size")
    g.add_argument("--methods", nargs="+", metavar="M", help="methods to run (default: all of the profile's)")
    g.add_argument("--repeats", type=int, help="timed steps per measurement (median reported)")
    g.add_argument("--warmup", type=int, help="untimed steps before timing")
    g.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop starting new measurements after this long (the rest is recorded as skipped); "
                        "--quick always measures its whole plan, with fewer repeats once behind the budget")
    g.add_argument("--memory-format", choices=("nchw", "channels_last"))
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="add torch.compile variants (CUDA profiles have them already)")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="drop torch.compile variants")
    g.add_argument("--no-cuda-graphs", action="store_true", help="drop CUDA-graph variants")
    g.add_argument("--no-ops", action="store_true", help="skip the fused ops' micro-benchmarks")
    g.add_argument("--dry-run", action="store_true", help="print the planned comparisons and exit")


def _positive(name: str, value) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(v < 1 for v in values):
        raise ValueError(f"--{name} must be >= 1, got {value}")


def build_profile(args):
    """The profile ``args`` ask for: the default one for the device, with the overrides applied."""
    import dataclasses

    from ..benchmark.methods import METHODS
    from ..benchmark.plan import ModelCase, default_profile, model_case
    from ..benchmark.steps import Variant

    profile = default_profile(args.device, args.quick)
    for name in ("branches", "batch_size", "infer_batches", "image_size", "repeats"):
        value = getattr(args, name)
        if value is not None:
            _positive(name.replace("_", "-"), value)
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(f"--time-budget must be > 0 seconds, got {args.time_budget}")

    cases = list(profile.cases)
    if args.models:
        known = {c.model: c for c in profile.cases}
        cases = []
        for name in args.models:
            base = known.get(name)
            default = profile.cases[0]
            cases.append(base or model_case(name, (1, 2, 4), default.train_batch, default.infer_batches))
    cases = [
        ModelCase(
            c.model,
            tuple(args.branches) if args.branches else c.branches,
            args.image_size or c.image_size,
            c.num_classes,
            args.batch_size or c.train_batch,
            tuple(args.infer_batches) if args.infer_batches else c.infer_batches,
        )
        for c in cases
    ]
    changes = {"cases": tuple(cases)}
    if args.methods:
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
        changes["methods"] = tuple(m for m in METHODS if m in args.methods)
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    if args.warmup is not None:
        changes["warmup"] = args.warmup
    if args.time_budget is not None:
        changes["time_budget_s"] = args.time_budget
    if args.memory_format is not None:
        changes["channels_last"] = args.memory_format == "channels_last"
    if args.no_ops:
        changes["ops"] = False
    train, infer = list(profile.train_variants), list(profile.infer_variants)
    if args.compile is False:
        train = [v for v in train if not v.compile]
        infer = [v for v in infer if not v.compile]
    elif args.compile and not any(v.compile for v in train):
        train += [Variant(v.amp_dtype, compile=True, cuda_graphs=v.cuda_graphs) for v in list(train)]
    if args.no_cuda_graphs:
        train = [v for v in train if not v.cuda_graphs]
        infer = [v for v in infer if not v.cuda_graphs]
    changes["train_variants"] = tuple(dict.fromkeys(train))
    changes["infer_variants"] = tuple(dict.fromkeys(infer))
    return dataclasses.replace(profile, **changes)


def run(args) -> int:
    import time
    from pathlib import Path

    from ..benchmark.plan import describe
    from ..benchmark.suite import run_suite

    profile = build_profile(args)
    if args.dry_run:
        print("\n".join(describe(profile)))
        return 0
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out must be a folder, got the file {out}")
    started = time.time()
    results = run_suite(profile, out, log=lambda line: print(line, flush=True))
    print(written_message(out, started, results))
    return 0 if results["complete"] else 1


def written_message(out, started: float, results: dict) -> str:
    """What this run wrote (files older than the run, e.g. last run's plots, are not named)."""
    written = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")
                     and p.stat().st_mtime >= started - 1)
    message = f"wrote {', '.join(written) or 'nothing'} in {out}"
    if not any(name.endswith(".png") for name in written):
        reason = next((n.split(": ", 1)[1] for n in results.get("notes", []) if n.startswith("plots not drawn")),
                      "nothing to plot")
        message += f" (no plots: {reason})"
    return message + ("" if results["complete"] else " (PARTIAL: interrupted)")
