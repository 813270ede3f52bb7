"""AutoAugment and RandAugment applied to a whole batch, each image with its own operations.

torchvision's ``AutoAugment``/``RandAugment`` draw ONE operation per call, so a batch
tensor gets the same operation on every image.  Here every image draws its own
(operation, magnitude, sign) per stage, on the host; the images are then grouped by
what they drew and each group goes through torchvision's operation as one batch.
A batch therefore costs one call per distinct draw (at most about 60), not one per
image, and runs on the tensor's device.  The policies, magnitude tables and the
operations themselves are torchvision's, so results equal torchvision's per image.

Drawing on the host keeps the device free of synchronisation: group membership is
known to Python without reading device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: "autoaugment": AutoAugment's CIFAR-10 policy (the official code's choice on CIFAR-10 and
#: CIFAR-100); "autoaugment_imagenet": its ImageNet policy (the official code on ImageNet).
POLICIES = ("autoaugment", "autoaugment_imagenet", "randaugment")

#: Fill of the area uncovered by geometric operations (the official code's grey).
GEOMETRIC_FILL = 128


@dataclass(frozen=True)
class Operation:
    name: str  # torchvision's transform id, e.g. "ShearX"
    magnitude: float


@dataclass
class PolicyPlan:
    """Per stage: for each image, an index into ``operations`` (-1: untouched)."""

    operations: list[Operation]
    stages: list[np.ndarray]


class BatchPolicy:
    """AutoAugment (CIFAR-10 or ImageNet policy) or RandAugment over a batch of uint8 images."""

    def __init__(self, kind: str, *, num_ops: int = 2, magnitude: int = 9, fill: int = GEOMETRIC_FILL) -> None:
        from torchvision.transforms import v2

        if kind not in POLICIES:
            raise ValueError(f"augmentation policy must be one of {POLICIES}, got {kind!r}")
        self.kind = kind
        if kind in ("autoaugment", "autoaugment_imagenet"):
            policy = v2.AutoAugmentPolicy.CIFAR10 if kind == "autoaugment" else v2.AutoAugmentPolicy.IMAGENET
            self._transform = v2.AutoAugment(policy, fill=fill)
            self.num_bins = 10
        else:
            if not isinstance(num_ops, int) or num_ops < 1:
                raise ValueError(f"RandAugment needs num_ops >= 1, got {num_ops!r}")
            if not isinstance(magnitude, int) or not 0 <= magnitude < 31:
                raise ValueError(f"RandAugment magnitude must be an int in [0, 31), got {magnitude!r}")
            self._transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, fill=fill)
            self.num_bins = 31
        self.num_ops = num_ops
        self.magnitude = magnitude

    # -- drawing --------------------------------------------------------------------------
    def _magnitude(self, name: str, bin_index, height: int, width: int, negative: bool) -> float:
        magnitudes_fn, signed = self._transform._AUGMENTATION_SPACE[name]
        magnitudes = magnitudes_fn(self.num_bins, height, width)
        if magnitudes is None:
            return 0.0
        value = float(magnitudes[bin_index])
        return -value if signed and negative else value

    def sample(self, count: int, height: int, width: int, generator: torch.Generator) -> PolicyPlan:
        """Draw every image's operations with a CPU generator."""
        operations: list[Operation] = []
        index_of: dict[Operation, int] = {}

        def intern(op: Operation) -> int:
            if op not in index_of:
                index_of[op] = len(operations)
                operations.append(op)
            return index_of[op]

        stages = []
        if self.kind != "randaugment":
            policies = self._transform._policies
            choice = torch.randint(len(policies), (count,), generator=generator).numpy()
            for stage in range(2):
                apply = torch.rand(count, generator=generator).numpy()
                negative = (torch.rand(count, generator=generator) <= 0.5).numpy().astype(np.int64)
                # op_table[policy, sign]: the operation; probability[policy]: how often it applies
                op_table = np.array([[intern(Operation(name, self._magnitude(name, bins, height, width, sign)))
                                      for sign in (False, True)]
                                     for name, _, bins in (p[stage] for p in policies)], dtype=np.int64)
                probability = np.array([p[stage][1] for p in policies])
                ids = op_table[choice, negative]
                stages.append(np.where(apply < probability[choice], ids, -1))
        else:
            names = list(self._transform._AUGMENTATION_SPACE)
            op_table = np.array([[intern(Operation(name, self._magnitude(name, self.magnitude, height, width, sign)))
                                  for sign in (False, True)] for name in names], dtype=np.int64)
            for _ in range(self.num_ops):
                choice = torch.randint(len(names), (count,), generator=generator).numpy()
                negative = (torch.rand(count, generator=generator) <= 0.5).numpy().astype(np.int64)
                stages.append(op_table[choice, negative])
        return PolicyPlan(operations, stages)

    # -- applying -------------------------------------------------------------------------
    def apply_operation(self, images: Tensor, op: Operation) -> Tensor:
        """torchvision's operation on a batch (every image gets the same one)."""
        t = self._transform
        return t._apply_image_or_video_transform(images, op.name, op.magnitude, interpolation=t.interpolation,
                                                 fill=t._fill)

    def apply(self, images: Tensor, plan: PolicyPlan) -> Tensor:
        """Apply ``plan`` to ``uint8 [B, C, H, W]`` images (a new tensor)."""
        out = images.clone()
        for ids in plan.stages:
            for op_id in np.unique(ids):
                if op_id < 0 or plan.operations[op_id].name == "Identity":
                    continue
                members = torch.from_numpy(np.flatnonzero(ids == op_id))
                if out.device.type == "cuda":
                    members = members.pin_memory().to(out.device, non_blocking=True)
                out.index_copy_(0, members, self.apply_operation(out.index_select(0, members), plan.operations[op_id]))
        return out

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        plan = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, plan)
