"""Per-branch views: every branch sees its own augmentation of every image, made in batches.

Divide-and-co-training feeds each of the S branches a differently augmented view of
the same images (the co-training term then asks the branches to agree).  The views
are made here from ``uint8`` images already on the training device, for the whole
batch at once: random crop with zero padding, horizontal flip, optionally AutoAugment
or RandAugment, normalisation, random erasing (cutout) - the official code's order.
Mixup then mixes the batch with ONE lambda and ONE pairing for all branches (mixing
branches differently would make their targets disagree, which the co-training term
would punish).

All randomness comes from the augmenter's own generators (a device generator for
crops, flips, erasing and the mixup pairing; a CPU generator for AutoAugment/
RandAugment draws; a numpy generator for lambda); their state is part of a
checkpoint, so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .policies import POLICIES, BatchPolicy


@dataclass(frozen=True)
class AugmentConfig:
    """How training views are made (defaults: the paper's CIFAR recipe)."""

    crop_padding: int = 4  # random crop of the original size from the zero-padded image; 0 disables
    flip: bool = True  # horizontal flip with probability 1/2
    policy: str = "none"  # "none" | "autoaugment" (CIFAR-10 policy) | "randaugment"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    erase_p: float = 0.5  # random erasing (cutout with zeros after normalisation); 0 disables
    erase_scale: tuple[float, float] = (0.0625, 0.1)  # erased fraction of the image (official CIFAR-100)
    erase_ratio: tuple[float, float] = (0.99, 1.0)  # aspect ratio of the erased rectangle
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) mixing; 0 disables
    same_view: bool = False  # every branch gets the same view (ablation of per-branch views)

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {self.crop_padding!r}")
        if self.policy not in ("none",) + POLICIES:
            raise ValueError(f"policy must be one of {('none',) + POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.erase_p <= 1.0:
            raise ValueError(f"erase_p must lie in [0, 1], got {self.erase_p!r}")
        lo, hi = self.erase_scale
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"erase_scale must satisfy 0 < low <= high < 1, got {self.erase_scale!r}")
        lo, hi = self.erase_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"erase_ratio must satisfy 0 < low <= high, got {self.erase_ratio!r}")
        if not (self.mixup_alpha >= 0.0 and math.isfinite(self.mixup_alpha)):
            raise ValueError(f"mixup_alpha must be a finite number >= 0, got {self.mixup_alpha!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Per image, a random ``H x W`` window of the image zero-padded by ``padding``."""
    if padding == 0:
        return images
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # [n, h]
    cols = offsets[1, :, None] + torch.arange(w, device=device)  # [n, w]
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [n,h,w,c] -> [n,c,h,w]


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_erase(images: Tensor, p: float, scale: Sequence[float], ratio: Sequence[float],
                 generator: torch.Generator) -> Tensor:
    """Zero one random rectangle per image with probability ``p`` (torchvision's RandomErasing)."""
    n, _, h, w = images.shape
    device = images.device

    def uniform(low: float, high: float) -> Tensor:
        return torch.rand(n, generator=generator, device=device) * (high - low) + low

    apply = torch.rand(n, generator=generator, device=device) < p
    area = uniform(*scale) * (h * w)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (torch.rand(n, generator=generator, device=device) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=generator, device=device) * (w - ew + 1)).floor()
    r = torch.arange(h, device=device)
    c = torch.arange(w, device=device)
    in_rows = (r >= top[:, None]) & (r < (top + eh)[:, None])  # [n, h]
    in_cols = (c >= left[:, None]) & (c < (left + ew)[:, None])  # [n, w]
    mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
    return images.masked_fill(mask[:, None], 0.0)


class Normalize:
    """``uint8 [..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str) -> None:
        self.shift = torch.tensor([m * 255.0 for m in mean], device=device).view(3, 1, 1)
        self.scale = torch.tensor([1.0 / (s * 255.0) for s in std], device=device).view(3, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        return (images.to(torch.float32) - self.shift) * self.scale


class BatchAugmenter:
    """Makes the S training views of a batch, and normalises test images.

    Args:
        config: an :class:`AugmentConfig`.
        mean, std: per-channel statistics in [0, 1] (``ImageDataset.mean/std``).
        device: where the images are and the views are made.
        seed: seeds the augmenter's generators.
    """

    def __init__(self, config: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str, seed: int) -> None:
        self.config = config
        self.device = torch.device(device)
        self.normalize = Normalize(mean, std, self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.host_generator = torch.Generator().manual_seed(seed + 1)
        self.numpy_generator = np.random.Generator(np.random.PCG64(seed + 2))
        self.policy: Optional[BatchPolicy] = None
        if config.policy != "none":
            self.policy = BatchPolicy(config.policy, num_ops=config.randaugment_ops,
                                      magnitude=config.randaugment_magnitude)

    # -- state (for checkpoints) ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "host_generator": self.host_generator.get_state(),
            "numpy_generator": self.numpy_generator.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.host_generator.set_state(state["host_generator"])
        self.numpy_generator.bit_generator.state = state["numpy_generator"]

    # -- views -------------------------------------------------------------------------------
    def augment(self, images: Tensor) -> Tensor:
        """One random view of each ``uint8 [n, 3, H, W]`` image -> normalised float32."""
        cfg = self.config
        x = random_crop(images, cfg.crop_padding, self.generator)
        if cfg.flip:
            x = random_flip(x, self.generator)
        if self.policy is not None:
            x = self.policy(x.contiguous(), self.host_generator)
        x = self.normalize(x)
        if cfg.erase_p > 0:
            x = random_erase(x, cfg.erase_p, cfg.erase_scale, cfg.erase_ratio, self.generator)
        return x

    def views(self, images: Tensor, branches: int) -> Tensor:
        """``uint8 [B, 3, H, W]`` -> ``float32 [B, S, 3, H, W]``, an independent view per branch."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"views expects uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        b = images.shape[0]
        if self.config.same_view or branches == 1:
            return self.augment(images).unsqueeze(1).expand(b, branches, *images.shape[1:])
        repeated = images.unsqueeze(1).expand(b, branches, *images.shape[1:]).reshape(b * branches, *images.shape[1:])
        return self.augment(repeated).reshape(b, branches, *images.shape[1:])

    def mixup(self, views: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Mix the batch with one lambda and one pairing shared by all branches.

        Returns the mixed views and soft targets ``[B, K]`` (float32); with
        ``mixup_alpha == 0`` the views and class labels unchanged.
        """
        alpha = self.config.mixup_alpha
        if alpha <= 0:
            return views, labels
        lam = float(self.numpy_generator.beta(alpha, alpha))
        pairing = torch.randperm(views.shape[0], generator=self.generator, device=views.device)
        mixed = views * lam + views.index_select(0, pairing) * (1.0 - lam)
        one_hot = F.one_hot(labels, num_classes).to(torch.float32)
        targets = one_hot * lam + one_hot.index_select(0, pairing) * (1.0 - lam)
        return mixed, targets

    def training_batch(self, images: Tensor, labels: Tensor, branches: int, num_classes: int) -> tuple[Tensor, Tensor]:
        """Views and (mixed) targets of one training batch."""
        return self.mixup(self.views(images, branches), labels, num_classes)
