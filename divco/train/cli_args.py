"""Command-line options of ``divco train`` / ``divco compare`` and their mapping to TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Optional

from ..data.augment import CROPS, AugmentConfig
from ..data.policies import POLICIES
from ..data.sources import describe_sources
from .config import COT_KINDS, PRECISIONS, TrainConfig


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _bool_flag(parser, name: str, default: Optional[bool], help: str) -> None:
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                        default=default, help=help)


def add_run_arguments(parser: argparse.ArgumentParser, *, branches_nargs: bool = False) -> None:
    """Every TrainConfig option except ``out``/``resume`` (added by the commands)."""
    parser.add_argument("--model", required=True, help="a model name (`divco models` lists them)")
    if branches_nargs:
        parser.add_argument("--branches", type=int, nargs="+", default=[1, 4], metavar="S",
                            help="numbers of branches to compare (default: 1 4)")
    else:
        parser.add_argument("--branches", type=int, default=1, metavar="S", help="S, the number of small networks")
    parser.add_argument("--data", default="digits", help=f"{describe_sources()} (default: digits)")
    parser.add_argument("--epochs", type=int, default=300, help="default 300 (the paper's)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")

    opt = parser.add_argument_group("optimiser and schedule (default: the dataset's official recipe)")
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    opt.add_argument("--recipe", default="auto", choices=meta["recipe"]["choices"], help=meta["recipe"]["help"])
    opt.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: the recipe's, 0.1 at any batch size officially)")
    opt.add_argument("--lr-scaling", default=None, choices=meta["lr_scaling"]["choices"],
                     help=meta["lr_scaling"]["help"])
    opt.add_argument("--momentum", type=float, default=0.9)
    _bool_flag(opt, "nesterov", True, "Nesterov momentum (default on)")
    opt.add_argument("--weight-decay", type=float, default=None,
                     help="default by model and dataset (the official table), before division")
    _bool_flag(opt, "divide-weight-decay", None, meta["divide_weight_decay"]["help"])
    _bool_flag(opt, "exempt-norm-weight-decay", None, meta["exempt_norm_weight_decay"]["help"])
    opt.add_argument("--warmup-epochs", type=float, default=None,
                     help="linear lr warm-up (default: the official count, 20 of 300 CIFAR epochs, 5 on ImageNet)")
    opt.add_argument("--warmup-start-lr", type=float, default=5e-3)
    opt.add_argument("--min-lr", type=float, default=None, help=meta["min_lr"]["help"])
    opt.add_argument("--label-smoothing", type=float, default=None, help=meta["label_smoothing"]["help"])

    cot = parser.add_argument_group("co-training")
    cot.add_argument("--cot-weight", type=float, default=0.5)
    cot.add_argument("--cot-kind", choices=COT_KINDS, default="js")
    cot.add_argument("--cot-warmup-epochs", type=int, default=None,
                     help="linear per-epoch warm-up of the weight (default 40/300 of the run)")
    cot.add_argument("--temperature", type=float, default=1.0)
    cot.add_argument("--backend", default=None, help="divco.ops backend (default: the fastest available)")

    aug = parser.add_argument_group("data and augmentation")
    defaults = AugmentConfig()
    aug.add_argument("--image-size", type=int, default=None, help="resize every image to this size (digits: 32)")
    aug.add_argument("--train-subset", type=int, default=None, help="train on at most this many images")
    aug.add_argument("--test-subset", type=int, default=None, help="test on at most this many images")
    aug.add_argument("--cache-dir", default=None,
                     help="decoded-data cache (default $DIVCO_CACHE_DIR/data or ~/.cache/divco/data)")
    aug.add_argument("--no-cache", action="store_true", help="decode the data every time")
    aug.add_argument("--crop-padding", type=int, default=defaults.crop_padding)
    _bool_flag(aug, "flip", defaults.flip, "random horizontal flips (default on)")
    aug.add_argument("--crop", choices=CROPS, default=None,
                     help="pad (CIFAR: random crop of the zero-padded image) or resized (ImageNet's random resized "
                          "crop); default: the recipe's")
    aug.add_argument("--policy", choices=("none",) + POLICIES, default=None,
                     help="AutoAugment (CIFAR-10 or ImageNet policy) or RandAugment (default: the recipe's: "
                          "autoaugment on CIFAR, autoaugment_imagenet on ImageNet, none in quick)")
    aug.add_argument("--randaugment-ops", type=int, default=defaults.randaugment_ops)
    aug.add_argument("--randaugment-magnitude", type=int, default=defaults.randaugment_magnitude)
    aug.add_argument("--erase-p", type=float, default=defaults.erase_p, help="random erasing probability")
    aug.add_argument("--erase-scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                     help="erased area fraction (default: the recipe's, (0.125, 0.2) CIFAR-10, (0.0625, 0.1) "
                          "CIFAR-100, (0.05, 0.12) ImageNet)")
    aug.add_argument("--mixup-alpha", type=float, default=defaults.mixup_alpha, help="0 disables mixup")
    aug.add_argument("--same-view", action="store_true", help="every branch gets the same augmented view")
    aug.add_argument("--eval-batch-size", type=int, default=None)

    speed = parser.add_argument_group("model and speed")
    speed.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                       help='extra model builder arguments, e.g. \'{"dropout": 0.1}\'')
    speed.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 autocast on GPUs (fp16 + GradScaler without bf16), fp32 on CPUs")
    _bool_flag(speed, "channels-last", None, "channels-last memory format (default: on for CUDA)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the forward pass and loss")
    speed.add_argument("--execution", choices=("auto", "batched", "per_branch"), default="auto")
    speed.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm across processes (CUDA)")

    out = parser.add_argument_group("output")
    out.add_argument("--keep-checkpoints", type=int, default=3, help="epoch checkpoints kept besides best.pt")
    out.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    out.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs even when installed")


def config_from_args(args: argparse.Namespace, *, out: str, branches: int, resume: bool) -> TrainConfig:
    augment = AugmentConfig(
        crop_padding=args.crop_padding, flip=args.flip, crop=args.crop, policy=args.policy,
        randaugment_ops=args.randaugment_ops, randaugment_magnitude=args.randaugment_magnitude, erase_p=args.erase_p,
        erase_scale=tuple(args.erase_scale) if args.erase_scale is not None else None,
        mixup_alpha=args.mixup_alpha, same_view=args.same_view,
    )
    return TrainConfig(
        model=args.model, out=out, branches=branches, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
        seed=args.seed, device=args.device, resume=resume, recipe=args.recipe, lr=args.lr,
        lr_scaling=args.lr_scaling, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        divide_weight_decay=args.divide_weight_decay, exempt_norm_weight_decay=args.exempt_norm_weight_decay,
        warmup_epochs=args.warmup_epochs, warmup_start_lr=args.warmup_start_lr, min_lr=args.min_lr,
        label_smoothing=args.label_smoothing,
        cot_weight=args.cot_weight, cot_kind=args.cot_kind, cot_warmup_epochs=args.cot_warmup_epochs,
        temperature=args.temperature, backend=args.backend, augment=augment, image_size=args.image_size,
        train_subset=args.train_subset, test_subset=args.test_subset,
        cache_dir=False if args.no_cache else args.cache_dir, eval_batch_size=args.eval_batch_size,
        model_kwargs=args.model_kwargs, precision=args.precision, channels_last=args.channels_last,
        compile=args.compile, execution=args.execution, sync_bn=args.sync_bn, keep_checkpoints=args.keep_checkpoints,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard,
    )


def exit_code(interrupted: Optional[str]) -> int:
    """0 when the run finished; 128 + signal number when a signal stopped it (shell convention)."""
    if interrupted is None:
        return 0
    import signal

    try:
        return 128 + int(getattr(signal, interrupted))
    except (AttributeError, TypeError):
        return 1
