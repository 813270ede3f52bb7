"""The checks of a run's options beyond ``TrainConfig.validate``: the ones that ask the machine, the
environment or the recipe, run by ``train`` and ``divco train --print-config`` alike before anything
is allocated, any data is decoded or any process group is set up.

So ``--print-config`` refuses exactly what a run refuses (an unavailable device or backend, a
RandAugment setting the policy rejects, an option the method does not use), and a torchrun
launch of a single-process method fails on every rank at once instead of leaving one rank waiting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ..data.sources import data_on_disk


def check_run_options(config: Any, *, print_config: bool = False, num_classes: Optional[int] = None) -> None:
    """Raise ValueError (FileNotFoundError for absent paths) naming the first option a run would refuse.

    ``print_config``: the checks of ``--print-config`` too (a ``--resume`` folder must exist;
    ``num_classes``, the class count when the data is not on disk).
    """
    import torch

    from ..data.policies import BatchPolicy
    from ..data.sources import check_image_size
    from ..ops.backends import resolve_backend
    from .methods import method_class
    from .runtime import option, resolve_device

    check_image_size(config.image_size)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    method = method_class(config.method)
    method.check_launch(world_size)  # before init_process_group: no rank waits for another
    device = resolve_device(config.device)  # --device cuda without CUDA
    resolve_backend(config.backend, device, torch.float32)  # --backend (or DIVCO_BACKEND) unavailable there
    if config.augment.policy == "randaugment":
        BatchPolicy("randaugment", num_ops=config.augment.randaugment_ops,
                    magnitude=config.augment.randaugment_magnitude)
    method.check_options(config)
    _check_min_lr(config, option)
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 2):
        raise ValueError(f"--num-classes must be an int >= 2 (classification needs two classes), got {num_classes!r}")
    if print_config:
        _check_print_config(config, num_classes, device)


def _check_min_lr(config: Any, option) -> None:
    """An explicit --min-lr above the peak lr would silently become a constant schedule."""
    if config.min_lr is None:
        return
    lr, source = config.lr, "--lr"
    if lr is None:  # the recipe's peak: only where the recipe is known without reading the data
        from . import recipe

        if config.recipe == "auto" and config.data != "digits":
            from ..data.sources import identify_dataset

            if not data_on_disk(config.data):
                return
            name = recipe.recipe_name(config, identify_dataset(config.data))
        else:
            name = recipe.recipe_name(config, "digits" if config.data == "digits" else None)
        lr, source = recipe.resolve(config, name).lr, f"the {name} recipe's peak lr"
    if config.min_lr > lr:
        raise ValueError(f"{option('min_lr', config.min_lr)} is above {source} {lr:g}: the cosine floor must not "
                         f"exceed the peak learning rate")


def _check_print_config(config: Any, num_classes: Optional[int], device) -> None:
    from .runtime import option

    out = Path(config.out)
    if config.resume:
        if not out.is_dir():
            raise FileNotFoundError(f"{option('resume', True)}: the run folder {out} does not exist, so there is "
                                    f"nothing to resume; check {option('out')}")
        from .checkpoint import find_resume_point

        find_resume_point(config, device, verbose=False)  # refuses options that differ from the checkpoint's
    if data_on_disk(config.data):
        if num_classes is not None:
            raise ValueError(f"--num-classes is for --print-config without the data; the data {config.data} is "
                             f"here and its classes are counted from it")
        return
    if config.recipe not in ("cifar10", "cifar100", "imagenet"):
        raise FileNotFoundError(f"data path {config.data} does not exist; to print a run without its data, pass "
                                f"--recipe cifar10|cifar100|imagenet (the dataset's known size), optionally with "
                                f"--num-classes")
