"""The divco model zoo: branch-batched networks divided by the paper's rule.

    model = divco.models.create("wide_resnet16_8", num_classes=100, branches=4)
    logits = model(images)            # [N, 4, 100]
"""

from . import cifar_resnet  # noqa: F401  (registers the CIFAR family)
from .base import EXECUTIONS, BranchBatchedNetwork, default_execution
from .cifar_resnet import BranchBatchedCifarResNet, CifarResNetSpec
from .registry import create, get_entry, list, register

__all__ = [
    "BranchBatchedNetwork",
    "BranchBatchedCifarResNet",
    "CifarResNetSpec",
    "EXECUTIONS",
    "create",
    "default_execution",
    "get_entry",
    "list",
    "register",
]
