"""divco export: standalone branches of a checkpoint as safetensors files."""

from __future__ import annotations

HELP = "write one branch (--branch i) or every branch of a checkpoint as standalone safetensors models"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint written by divco train, or a run folder (its best.pt)")
    parser.add_argument("--branch", type=int, default=None, metavar="I",
                        help="the branch to export (default: all, one file each)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="with --branch: the file (default CKPT-branchI.safetensors); "
                             "without: a folder (default CKPT-branches/)")
    parser.add_argument("--fold-bn", action="store_true",
                        help="fold every BatchNorm that follows a convolution into it (inference weights)")
    parser.epilog = "Load an exported branch in Python with divco.train.load_branch(path)."


def run(args) -> int:
    from ..train.export import export_branches

    for path in export_branches(args.checkpoint, args.out, branch=args.branch, fold_bn=args.fold_bn):
        print(path)
    return 0
