"""ImageDataset: a classification data set decoded once into uint8 tensors."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageDataset:
    """Train and test images as ``uint8 [N, 3, H, W]`` tensors with ``int64 [N]`` labels.

    ``mean`` and ``std`` are per-channel statistics of the training images in [0, 1]
    (what the input normalisation uses).  ``source`` names where the data came from.
    """

    name: str
    source: str
    classes: tuple[str, ...]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"{self.name}: {split} images must be uint8 [N, 3, H, W], got {images.dtype} "
                    f"{tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise ValueError(
                    f"{self.name}: {split} labels must be int64 [{images.shape[0]}], got {labels.dtype} "
                    f"{tuple(labels.shape)}"
                )
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
                raise ValueError(
                    f"{self.name}: {split} labels must lie in [0, {len(self.classes)}), "
                    f"got [{int(labels.min())}, {int(labels.max())}]"
                )
        if self.train_images.shape[2:] != self.test_images.shape[2:]:
            raise ValueError(
                f"{self.name}: train and test images differ in size: {tuple(self.train_images.shape[2:])} "
                f"vs {tuple(self.test_images.shape[2:])}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[2:])  # type: ignore[return-value]

    def subset(self, train: Optional[int] = None, test: Optional[int] = None) -> "ImageDataset":
        """At most ``train`` training and ``test`` test images, a fixed random choice.

        The choice depends only on the data set's size, so every run (and every
        process of a distributed run) picks the same images.  Normalisation
        statistics stay those of the full training set.
        """

        def pick(images: Tensor, labels: Tensor, count: Optional[int], what: str):
            if count is None or count >= len(labels):
                return images, labels
            if count < 1:
                raise ValueError(f"a {what} subset needs at least 1 image, got {count}")
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:count]
            order = order.sort().values
            return images[order], labels[order]

        train_images, train_labels = pick(self.train_images, self.train_labels, train, "training")
        test_images, test_labels = pick(self.test_images, self.test_labels, test, "test")
        return replace(self, train_images=train_images, train_labels=train_labels,
                       test_images=test_images, test_labels=test_labels)

    def describe(self) -> str:
        h, w = self.image_size
        return (f"{self.name}: {len(self.train_labels)} training and {len(self.test_labels)} test images, "
                f"{h}x{w}, {self.num_classes} classes ({self.source})")


def channel_statistics(images: Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1]."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())  # type: ignore[return-value]
