"""Marks for the tests that need an optional dependency (skipped, naming the extra, where it is absent).

torchvision is the ``vision`` extra (divco[vision]): divco's torchvision ResNet conversions, the
AutoAugment/RandAugment policies and the resizing of images to another ``image_size`` import it.
"""

import importlib.util

import pytest

TORCHVISION_MISSING = importlib.util.find_spec("torchvision") is None

needs_torchvision = pytest.mark.skipif(TORCHVISION_MISSING,
                                       reason='needs torchvision (pip install "divco[vision]"), which is not installed')
