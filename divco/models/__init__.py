"""The divco model zoo: branch-batched networks divided by the paper's rule.

    model = divco.models.create("wide_resnet16_8", num_classes=100, branches=4)
    logits = model(images)            # [N, 4, 100]
"""

from . import cifar_resnet  # noqa: F401  (registers the CIFAR family)
from .base import EXECUTIONS, BranchBatchedNetwork, default_execution
from .cifar_resnet import BranchBatchedCifarResNet, CifarResNetSpec
from .imagenet_resnet import BranchBatchedResNet, ResNetSpec
from .imagenet_resnet_d import BranchBatchedResNetD, ResNetDSpec
from .pyramidnet import BranchBatchedPyramidNet, PyramidNetSpec
from .registry import MAX_BRANCHES, create, get_entry, list, register

__all__ = [
    "BranchBatchedNetwork",
    "BranchBatchedCifarResNet",
    "CifarResNetSpec",
    "BranchBatchedResNet",
    "ResNetSpec",
    "BranchBatchedResNetD",
    "ResNetDSpec",
    "MAX_BRANCHES",
    "BranchBatchedPyramidNet",
    "PyramidNetSpec",
    "EXECUTIONS",
    "create",
    "default_execution",
    "get_entry",
    "list",
    "register",
]
