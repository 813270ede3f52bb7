"""The validation split: held out of the training set, stratified by class, seeded, exact in size."""

from __future__ import annotations

import argparse

import pytest
import torch

from divco.data import ImageDataset
from divco.data.dataset import parse_val_split, validation_count, validation_indices


def dataset(counts=(30, 10, 60)) -> ImageDataset:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    images = torch.arange(len(labels), dtype=torch.int64).remainder(256).to(torch.uint8).view(-1, 1, 1, 1)
    images = images.expand(-1, 3, 2, 2).contiguous()
    return ImageDataset("toy", "test", tuple("abc"), images, labels, images[:5], labels[:5], (0.5,) * 3, (0.2,) * 3)


def test_the_split_is_stratified_exact_seeded_and_disjoint():
    data = dataset()
    split = data.with_validation(0.1, seed=3)
    assert split.val_labels.bincount().tolist() == [3, 1, 6]  # every class its share
    assert len(split.train_labels) == 90 and split.train_labels.bincount().tolist() == [27, 9, 54]
    held = set(split.val_images[:, 0, 0, 0].tolist())
    assert held.isdisjoint(split.train_images[:, 0, 0, 0].tolist())  # no validation image is trained on
    assert torch.equal(split.val_images, data.with_validation(0.1, seed=3).val_images)  # seeded
    assert not torch.equal(split.val_images, data.with_validation(0.1, seed=4).val_images)
    assert torch.equal(split.test_images, data.test_images) and split.mean == data.mean  # the rest untouched
    assert data.with_validation(0, seed=3) is data and not data.has_validation
    # a count: largest remainders make the total exact (7 of 100: 2.1, 0.7, 4.2 -> 2, 1, 4)
    assert data.with_validation(7, seed=0).val_labels.bincount().tolist() == [2, 1, 4]
    assert "90 training, 10 validation and 5 test images" in split.describe()


def test_the_split_survives_a_training_subset():
    split = dataset().with_validation(0.2, seed=0)
    small = split.subset(train=10)
    assert torch.equal(small.val_images, split.val_images) and len(small.train_labels) == 10


def test_validation_indices_are_sorted_and_count_exactly():
    labels = torch.randint(0, 10, (997,), generator=torch.Generator().manual_seed(1))
    for count in (1, 10, 99, 500):
        index = validation_indices(labels, count, seed=0)
        assert len(index) == count and torch.equal(index, index.sort().values) and len(set(index.tolist())) == count


@pytest.mark.parametrize("split, message", [
    (1.0, r"val_split must be a fraction in \[0, 1\) or an image count >= 0 \(an int\), got 1\.0"),
    (-3, r"got -3"), ("0.1", r"got '0\.1'"), (True, r"got True"),
])
def test_bad_splits_are_refused(split, message):
    with pytest.raises(ValueError, match=message):
        dataset().with_validation(split, seed=0)


def test_split_sizes_must_leave_both_parts():
    assert validation_count(0.1, 50000) == 5000
    with pytest.raises(ValueError, match=r"val_split 0\.001 of 100 training images gives 0 validation image\(s\)"):
        validation_count(0.001, 100)
    with pytest.raises(ValueError, match="must leave images to train on"):
        validation_count(100, 100)


def test_the_command_line_reads_fractions_and_counts():
    assert parse_val_split("0.1") == 0.1 and isinstance(parse_val_split("5000"), int) and parse_val_split("0") == 0
    for bad in ("abc", "1.5", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_val_split(bad)
