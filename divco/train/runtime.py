"""Process plumbing of a training run: device, precision, image order, RNG state, signals, messages."""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import threading
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn


def resolve_device(name: str, local_rank: int = 0, *, require_available: bool = True) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; ``"cuda"`` -> this process's GPU
    (``require_available=False``: also where no GPU is, for a plan that is printed, not run)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if require_available and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was requested but CUDA is not available here; use "
                             f"{option('device', 'cpu')}")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def resolve_precision(precision: str, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, whether a GradScaler is needed) for a TrainConfig.precision."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, got {device}; use bf16 or fp32 on the CPU")
    return torch.float16, True


def epoch_order(size: int, seed: int, epoch: int) -> Tensor:
    """The image order of an epoch: a pure function of (seed, epoch), the same on every process."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


def branch_epoch_orders(size: int, seed: int, epoch: int, branches: int) -> Tensor:
    """``[S, size]``: branch s's image order of an epoch in independent training, the order
    :func:`epoch_order` gives a separate run with seed ``seed + s`` (a pure function: resume keeps it)."""
    return torch.stack([epoch_order(size, seed + s, epoch) for s in range(branches)])


def process_shard(order: Tensor, rank: int, world_size: int) -> Tensor:
    """This process's images of the epoch: every world_size-th, all shards of equal length."""
    usable = (order.numel() // world_size) * world_size
    return order[rank:usable:world_size]


def to_model_layout(views: Tensor, channels_last: bool) -> Tensor:
    """``[B, S, 3, H, W]`` laid out so that the model's ``[B, S*3, H, W]`` view is channels-last."""
    if channels_last:
        return views.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    return views.contiguous()


# -- random state ------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def global_rng_state(device: torch.device) -> dict:
    """The global generators' state (torch CPU/CUDA, numpy, python), as checkpoint-safe values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_global_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and state["torch_cuda"] is not None:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- signals and messages ----------------------------------------------------------------------


class SignalStop:
    """SIGINT/SIGTERM ask the loop to stop after the current step and save a checkpoint.

    A second signal gets the previous behaviour (immediate exit), for when saving hangs.
    """

    def __init__(self, announce: bool) -> None:
        self.received: Optional[str] = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = name
        if self.announce:
            print(f"\n{name} received: saving a checkpoint after the current step (send it again to abort)",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def progress_bar(total: int, initial: int, description: str, enabled: bool):
    """A tqdm bar counting images (so it shows images/s and the ETA); only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="img", unit_scale=True, dynamic_ncols=True,
                leave=False, disable=None if enabled else True, file=sys.stderr)


def status_line(message: str, enabled: bool = True) -> None:
    """A status line on stderr that does not break a progress bar."""
    if enabled:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def python_spelling(name: str, value: object = None) -> str:
    """How the Python API names an option: ``batch_size=8`` (``batch_size`` without a value)."""
    return f"{name}={value!r}" if value is not None else name


#: The function that spells options in messages; a front end (the command line) puts its own
#: in place with :func:`option_spelling`, so that its errors speak its words.
_SPELLING = [python_spelling]


@contextlib.contextmanager
def option_spelling(spell: Callable[[str, object], str]):
    """Within this block, :func:`option` spells options with ``spell(name, value)``."""
    previous = _SPELLING[0]
    _SPELLING[0] = spell
    try:
        yield
    finally:
        _SPELLING[0] = previous


def option(name: str, value: object = None) -> str:
    """A TrainConfig option as the user spelled it (``batch_size=8``, or the front end's spelling)."""
    return _SPELLING[0](name, value)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The BranchBatchedNetwork inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model
