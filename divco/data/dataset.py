"""ImageDataset: a classification data set decoded once into uint8 tensors, and its validation split.

The validation split (``val_split``) is a held-out part of the training images: a fraction of
them (a float in (0, 1)) or a count (an int), 0 disables it.  It is stratified by class (each
class gives its share, the total exact by largest remainders) and seeded (the run's seed), and
taken from the full training set before ``train_subset`` picks among the rest, so a run's
validation images do not depend on its training subset.  Training selects best.pt on it and
``divco eval`` fits the temperature on it; the test set is only reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

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
    val_images: Optional[Tensor] = None  # the validation split (held out of the training images), if any
    val_labels: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError(f"{self.name}: validation images and labels must be given together")
        for split in ("train", "test") + (("val",) if self.val_images is not None else ()):
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

    @property
    def has_validation(self) -> bool:
        return self.val_images is not None

    def with_validation(self, split: "ValSplit", seed: int) -> "ImageDataset":
        """The training images minus a held-out validation split (:func:`validation_indices`); 0: unchanged."""
        check_val_split(split)
        if not split:
            return self
        held = validation_indices(self.train_labels, validation_count(split, len(self.train_labels)), seed)
        keep = torch.ones(len(self.train_labels), dtype=torch.bool)
        keep[held] = False
        return replace(self, train_images=self.train_images[keep], train_labels=self.train_labels[keep],
                       val_images=self.train_images[held], val_labels=self.train_labels[held])

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
        validation = f", {len(self.val_labels)} validation" if self.has_validation else ""
        return (f"{self.name}: {len(self.train_labels)} training{validation} and {len(self.test_labels)} test "
                f"images, {h}x{w}, {self.num_classes} classes ({self.source})")


# -- the validation split ------------------------------------------------------------------------

#: ``val_split``: a fraction of the training images (float in [0, 1)) or a count (int >= 0); 0 disables.
ValSplit = Union[float, int]

#: The default: a tenth of the training images, CIFAR's usual 5000 of 50000 (digits: 144 of 1437).
DEFAULT_VAL_SPLIT = 0.1


def check_val_split(split: object, name: str = "val_split") -> None:
    """ValueError unless ``split`` is a fraction in [0, 1) or a count >= 0."""
    if isinstance(split, bool) or not isinstance(split, (int, float)):
        raise ValueError(f"{name} must be a fraction in [0, 1) or an image count >= 0, got {split!r}")
    if isinstance(split, float) and not (math.isfinite(split) and 0.0 <= split < 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1) or an image count >= 0 (an int), got {split!r}")
    if isinstance(split, int) and split < 0:
        raise ValueError(f"{name} must be a fraction in [0, 1) or an image count >= 0, got {split!r}")


def parse_val_split(text: str) -> ValSplit:
    """The command line's ``--val-split``: ``5000`` is a count, ``0.1`` a fraction, ``0`` disables."""
    import argparse

    try:
        value: ValSplit = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or an image count, got {text!r}") from None
    try:
        check_val_split(value, "it")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def validation_count(split: ValSplit, train_images: int) -> int:
    """The images of a validation split of ``train_images`` training images (at least 1; some left to train)."""
    check_val_split(split)
    count = round(split * train_images) if isinstance(split, float) else split
    if count < 1 or count >= train_images:
        raise ValueError(f"val_split {split!r} of {train_images} training images gives {count} validation "
                         f"image(s); it needs at least 1 and must leave images to train on (0 disables it)")
    return count


def validation_indices(labels: Tensor, count: int, seed: int) -> Tensor:
    """``count`` sorted indices of ``labels``, stratified by class: class c gives count * n_c / N images
    (rounded by largest remainders, ties to the lower class), the first of a seeded permutation."""
    n, classes = len(labels), int(labels.max()) + 1 if len(labels) else 0
    sizes = torch.bincount(labels, minlength=classes).tolist()
    exact = [count * size / n for size in sizes]
    quota = [math.floor(e) for e in exact]
    by_remainder = sorted(range(classes), key=lambda c: (-(exact[c] - quota[c]), c))
    for c in by_remainder[: count - sum(quota)]:
        quota[c] += 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ordered_labels = labels[order]
    chosen = [order[ordered_labels == c][: quota[c]] for c in range(classes)]
    return torch.cat(chosen).sort().values


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
