"""divco ensemble-curve: accuracy of every ensemble size n = 1..S of runs' members against FLOPs.

Reading a run is one function, :func:`load_run_members` (RUN_DIR -> RunMembers); ``run`` takes
another through its ``load_run`` parameter, so the loading can be rewired without touching the
curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

HELP = "accuracy of ensembles of n = 1..S members of runs against FLOPs (curve.json, curve.md, curve.png)"

#: The checkpoint of a run directory the curve evaluates.
RUN_CHECKPOINT = "best.pt"


def add_arguments(parser) -> None:
    from ..ensembles.combine import WEIGHTED_ENSEMBLE_MODES
    from ..ensembles.curve import DEFAULT_CURVE_MODE, DEFAULT_MAX_SUBSETS

    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help=f"training run directories (their {RUN_CHECKPOINT} is evaluated; of a snapshot or cbnn "
                             f"run: its member checkpoints) or checkpoint files")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for curve.json, curve.md and curve.png")
    parser.add_argument("--mode", default=DEFAULT_CURVE_MODE, choices=WEIGHTED_ENSEMBLE_MODES,
                        help="how members are combined (default: geometric mean of probabilities, as Kondratyuk)")
    parser.add_argument("--max-subsets", type=int, default=DEFAULT_MAX_SUBSETS,
                        help="member subsets averaged per ensemble size when there are more (fixed-seed sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset sample")
    parser.add_argument("--data", default=None, help="data to test on (default: each run's training data)")
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=None)


def load_run_members(run_dir, args):
    """RunMembers of one run: its best checkpoint's members' test logits, label and member FLOPs.

    The checkpoint and its test data are read as ``divco eval`` reads them
    (:func:`divco.train.evaluate_checkpoint.load_checkpoint_on_test_data`).  The label is the
    network and its branch count, e.g. "wide_resnet16_1 (S=4)"; the FLOPs are 2 x the
    multiply-accumulates of one member (one branch) on one test image.  The folder of a snapshot
    or cbnn run (members.json) gives its M member checkpoints instead (:func:`load_checkpoint_members`).
    """
    import torch

    from ..ensembles.curve import RunMembers
    from ..summary import summary
    from ..train.evaluate_checkpoint import load_checkpoint_on_test_data
    from ..train.evaluation import predict
    from ..train.members import is_members_run

    path = Path(run_dir)
    if is_members_run(path):
        return load_checkpoint_members(run_dir, args)
    if path.is_dir() and not (path / RUN_CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run_dir}: no {RUN_CHECKPOINT} (expected a training run directory or a checkpoint)")
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no such run directory or checkpoint (expected one with {RUN_CHECKPOINT})")
    loaded = load_checkpoint_on_test_data(path, data=args.data, test_subset=args.test_subset, device=args.device,
                                          cache_dir=args.cache_dir)
    images = loaded.dataset.test_images
    member_macs = summary(loaded.model, tuple(images.shape[1:])).macs_per_branch
    logits = predict(loaded.model, images.to(loaded.device), loaded.normalize, batch_size=args.batch_size)  # [N, S, K]
    info = loaded.state["model_info"]
    return RunMembers(label=run_label(info), logits=logits.transpose(0, 1).to(torch.float64),
                      labels=loaded.dataset.test_labels.to(loaded.device), member_flops=2.0 * member_macs,
                      source=str(run_dir))


def load_checkpoint_members(run_dir, args):
    """RunMembers of a snapshot/cbnn run folder: its M member checkpoints (members.json), stacked into
    one M-branch model as ``divco eval RUN_DIR`` stacks them, on the test data of the first member.

    The curve combines subsets of them by ``--mode`` with equal weights, as for any run; the run's own
    weighted ensemble (cbnn's alphas) is what ``divco eval RUN_DIR`` reports. The label is e.g.
    "wide_resnet16_1 (cbnn, M=3)"; the FLOPs are one member's.
    """
    import torch

    from ..ensembles.curve import RunMembers
    from ..summary import summary
    from ..train.evaluate_checkpoint import load_checkpoint_on_test_data
    from ..train.evaluation import predict
    from ..train.members import load_members

    members = load_members(run_dir)
    first = Path(run_dir) / members.record["members"][0]["file"]
    loaded = load_checkpoint_on_test_data(first, data=args.data, test_subset=args.test_subset, device=args.device,
                                          cache_dir=args.cache_dir)
    model = members.stacked().to(loaded.device)
    images = loaded.dataset.test_images
    member_macs = summary(model, tuple(images.shape[1:])).macs_per_branch
    logits = predict(model, images.to(loaded.device), loaded.normalize, batch_size=args.batch_size)  # [N, M, K]
    info = members.states[0]["model_info"]
    label = f"{info['name']} ({members.method}, M={len(members.states)})"
    return RunMembers(label=label, logits=logits.transpose(0, 1).to(torch.float64),
                      labels=loaded.dataset.test_labels.to(loaded.device), member_flops=2.0 * member_macs,
                      source=str(run_dir))


def run_label(model_info: dict) -> str:
    """A curve's label: the network and its branch count, e.g. "wide_resnet16_2 (S=4)", and
    ", undivided" when the S members keep the full width (``--model-kwargs '{"divide": false}'``):
    the same name and S then mean members twice as wide."""
    undivided = (model_info.get("model_kwargs") or {}).get("divide") is False
    return f"{model_info['name']} (S={model_info['branches']}{', undivided' if undivided else ''})"


def run(args, load_run: Optional[Callable] = None) -> int:
    """Load every run (``load_run(run_dir, args) -> RunMembers``), compute and write the curve."""
    from ..ensembles.curve import curve_table, ensemble_curve, write_curve

    if not isinstance(args.max_subsets, int) or args.max_subsets < 1:
        raise ValueError(f"--max-subsets must be an int >= 1, got {args.max_subsets!r}")
    load = load_run if load_run is not None else load_run_members
    runs = [load(run_dir, args) for run_dir in args.runs]
    curve = ensemble_curve(runs, mode=args.mode, max_subsets=args.max_subsets, seed=args.seed)
    written = write_curve(curve, args.out)
    print(curve_table(curve), end="")
    for name, path in written.items():
        print(f"wrote {path}" if path is not None else f"{name} not drawn: matplotlib is not installed")
    return 0
