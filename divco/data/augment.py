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
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .policies import POLICIES, BatchPolicy


#: How a training view is cropped: "pad" (a random window of the original size from the image
#: zero-padded by ``crop_padding``: the official CIFAR crop) or "resized" (torchvision's
#: RandomResizedCrop with area scale ``RESIZED_CROP_SCALE`` and bicubic resampling back to the
#: image size: the official ImageNet crop).
CROPS: tuple[str, ...] = ("pad", "resized")
RESIZED_CROP_SCALE = (0.1, 1.0)  # the official ImageNet crop's area range
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)

#: The augmentation of each dataset recipe (divco.train.recipe): the official code's
#: dataset/factory.py for CIFAR-10, CIFAR-100 (AutoAugment on, as the released training
#: script sets it) and ImageNet (RandomResizedCrop, ImageNet AutoAugment, erasing); "quick"
#: is divco's small CPU preset (digits), no policy and CIFAR-100's erasing.
AUGMENT_PRESETS: dict[str, dict] = {
    "cifar10": dict(crop="pad", policy="autoaugment", erase_scale=(0.125, 0.2), erase_ratio=(0.99, 1.0)),
    "cifar100": dict(crop="pad", policy="autoaugment", erase_scale=(0.0625, 0.1), erase_ratio=(0.99, 1.0)),
    "imagenet": dict(crop="resized", policy="autoaugment_imagenet", erase_scale=(0.05, 0.12),
                     erase_ratio=(0.5, 1.5)),
    "quick": dict(crop="pad", policy="none", erase_scale=(0.0625, 0.1), erase_ratio=(0.99, 1.0)),
}

#: The fields whose ``None`` means "the dataset's recipe decides" (divco.train.recipe).
RECIPE_FIELDS = ("crop", "policy", "erase_scale", "erase_ratio")


@dataclass(frozen=True)
class AugmentConfig:
    """How training views are made.

    ``None`` in ``crop``, ``policy``, ``erase_scale`` or ``erase_ratio`` means "the
    dataset's recipe" (:func:`divco.train.recipe.resolve_augment` fills them in: e.g.
    CIFAR-10 gets AutoAugment and erasing scale (0.125, 0.2)); a
    :class:`BatchAugmenter` takes only a resolved config.
    """

    crop_padding: int = 4  # "pad" crop: zero padding on each side; 0 disables the crop
    flip: bool = True  # horizontal flip with probability 1/2
    crop: Optional[str] = None  # "pad" | "resized" (see CROPS)
    policy: Optional[str] = None  # "none" | "autoaugment" | "autoaugment_imagenet" | "randaugment"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    erase_p: float = 0.5  # random erasing (cutout with zeros after normalisation); 0 disables
    erase_scale: Optional[tuple[float, float]] = None  # erased fraction of the image
    erase_ratio: Optional[tuple[float, float]] = None  # aspect ratio of the erased rectangle
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) mixing; 0 disables
    same_view: bool = False  # every branch gets the same view (ablation of per-branch views)

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {self.crop_padding!r}")
        if self.crop is not None and self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS} or None (the recipe's), got {self.crop!r}")
        if self.policy is not None and self.policy not in ("none",) + POLICIES:
            raise ValueError(f"policy must be one of {('none',) + POLICIES} or None (the recipe's), "
                             f"got {self.policy!r}")
        if not 0.0 <= self.erase_p <= 1.0:
            raise ValueError(f"erase_p must lie in [0, 1], got {self.erase_p!r}")
        if self.erase_scale is not None:
            lo, hi = self.erase_scale
            if not 0.0 < lo <= hi < 1.0:
                raise ValueError(f"erase_scale must satisfy 0 < low <= high < 1, got {self.erase_scale!r}")
        if self.erase_ratio is not None:
            lo, hi = self.erase_ratio
            if not 0.0 < lo <= hi:
                raise ValueError(f"erase_ratio must satisfy 0 < low <= high, got {self.erase_ratio!r}")
        if not (self.mixup_alpha >= 0.0 and math.isfinite(self.mixup_alpha)):
            raise ValueError(f"mixup_alpha must be a finite number >= 0, got {self.mixup_alpha!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def unresolved(self) -> list[str]:
        """The recipe fields still ``None``."""
        return [name for name in RECIPE_FIELDS if getattr(self, name) is None]

    def with_defaults(self, **defaults) -> "AugmentConfig":
        """A copy whose ``None`` recipe fields take ``defaults`` (explicit values are kept)."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


def random_resized_crop(images: Tensor, generator: torch.Generator, scale: Sequence[float] = RESIZED_CROP_SCALE,
                        ratio: Sequence[float] = RESIZED_CROP_RATIO) -> Tensor:
    """Per image, a random area/aspect window resampled (bicubic) to the image size; uint8 in, uint8 out.

    torchvision's RandomResizedCrop draws up to 10 tries and falls back to a centre crop;
    here every image draws once and its window is clamped into the image (the same
    distribution wherever a try would succeed at once).
    """
    n, _, h, w = images.shape
    device = images.device
    area = torch.empty(n, device=device).uniform_(scale[0], scale[1], generator=generator) * (h * w)
    log_ratio = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    cw = torch.sqrt(area * aspect).clamp(1, w)
    ch = torch.sqrt(area / aspect).clamp(1, h)
    left = torch.rand(n, generator=generator, device=device) * (w - cw)
    top = torch.rand(n, generator=generator, device=device) * (h - ch)
    # affine grid in [-1, 1] coordinates (align_corners=False): centre and half-size of each window
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = cw / w
    theta[:, 1, 1] = ch / h
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, (n, images.shape[1], h, w), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


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
                 device: torch.device | str, seed: int, label_smoothing: float = 0.0) -> None:
        if config.unresolved():
            raise ValueError(f"BatchAugmenter needs a resolved AugmentConfig; {config.unresolved()} are None "
                             f"(divco.train.recipe.resolve_augment fills in the dataset's recipe)")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        self.config = config
        self.label_smoothing = label_smoothing
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
        if cfg.crop == "resized":
            x = random_resized_crop(images, self.generator)
        else:
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

    def smooth(self, targets: Tensor, num_classes: int) -> Tensor:
        """Label smoothing as the official code applies it: ``(1 - e) * target + e / K``.

        On mixed targets this equals the official mixup of two smoothed losses
        (``lam * CE(smooth(a)) + (1 - lam) * CE(smooth(b))``), the loss being linear in the target.
        """
        e = self.label_smoothing
        if e == 0.0:
            return targets
        if targets.dim() == 1:
            targets = F.one_hot(targets, num_classes).to(torch.float32)
        return targets * (1.0 - e) + e / num_classes

    def training_batch(self, images: Tensor, labels: Tensor, branches: int, num_classes: int) -> tuple[Tensor, Tensor]:
        """Views and (mixed, smoothed) targets of one training batch."""
        views, targets = self.mixup(self.views(images, branches), labels, num_classes)
        return views, self.smooth(targets, num_classes)
