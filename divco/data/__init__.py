"""Data for divide-and-co-training: decoded once into uint8 tensors, augmented in batches.

    data = divco.data.load_dataset("digits")            # or a CIFAR / image-folder path
    config = divco.data.AugmentConfig().with_defaults(**divco.data.AUGMENT_PRESETS["cifar100"])
    augmenter = divco.data.BatchAugmenter(config, data.mean, data.std, "cpu", seed=0)
    views, targets = augmenter.training_batch(data.train_images[:64], data.train_labels[:64], branches=4,
                                              num_classes=data.num_classes)   # [64, 4, 3, 32, 32], [64, 10]
"""

from .augment import AUGMENT_PRESETS, AugmentConfig, BatchAugmenter, Normalize, random_crop, random_erase, random_flip
from .cache import default_cache_dir
from .dataset import ImageDataset, channel_statistics
from .policies import POLICIES, BatchPolicy
from .sources import describe_sources, load_dataset

__all__ = [
    "AUGMENT_PRESETS",
    "AugmentConfig",
    "BatchAugmenter",
    "BatchPolicy",
    "ImageDataset",
    "Normalize",
    "POLICIES",
    "channel_statistics",
    "default_cache_dir",
    "describe_sources",
    "load_dataset",
    "random_crop",
    "random_erase",
    "random_flip",
]
