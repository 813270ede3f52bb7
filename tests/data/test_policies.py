"""Batched AutoAugment / RandAugment equal torchvision's operations applied image by image."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision", reason="torchvision is optional (divco[vision])")
from torchvision.transforms import v2  # noqa: E402

from divco.data import BatchPolicy
from divco.data.policies import Operation


def images(n: int, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)


@pytest.mark.parametrize("kind", ["autoaugment", "randaugment"])
def test_batched_plan_equals_per_image_torchvision(kind):
    policy = BatchPolicy(kind)
    x = images(64)
    plan = policy.sample(64, 12, 10, torch.Generator().manual_seed(3))
    out = policy.apply(x, plan)
    reference = torchvision_reference(policy)
    for i in range(64):
        expected = x[i]
        for ids in plan.stages:
            if ids[i] >= 0:
                op = plan.operations[ids[i]]
                expected = reference._apply_image_or_video_transform(
                    expected, op.name, op.magnitude, interpolation=reference.interpolation, fill=reference._fill)
        assert torch.equal(out[i], expected), f"image {i}"
    assert not torch.equal(out, x)


def torchvision_reference(policy: BatchPolicy):
    if policy.kind == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128)
    return v2.RandAugment(num_ops=policy.num_ops, magnitude=policy.magnitude, fill=128)


def test_every_operation_matches_single_image_calls():
    policy = BatchPolicy("randaugment", magnitude=15)
    x = images(5)
    for name in policy._transform._AUGMENTATION_SPACE:
        for negative in (False, True):
            op = Operation(name, policy._magnitude(name, 15, 12, 10, negative))
            batched = policy.apply_operation(x, op)
            singles = torch.stack([policy.apply_operation(x[i:i + 1], op)[0] for i in range(5)])
            assert torch.equal(batched, singles), name


def test_autoaugment_draws_follow_the_cifar10_policy():
    policy = BatchPolicy("autoaugment")
    plan = policy.sample(20000, 32, 32, torch.Generator().manual_seed(0))
    names = [op.name for op in plan.operations]
    assert set(names) <= {"Invert", "Contrast", "Rotate", "TranslateX", "Sharpness", "ShearY", "TranslateY",
                          "AutoContrast", "Equalize", "Posterize", "Color", "Brightness", "Solarize"}
    # stage-one application rate: the mean of the 25 sub-policies' first probabilities
    first_probabilities = [p[0][1] for p in policy._transform._policies]
    expected = sum(first_probabilities) / len(first_probabilities)
    assert abs((plan.stages[0] >= 0).mean() - expected) < 0.02


def test_randaugment_applies_num_ops_operations():
    policy = BatchPolicy("randaugment", num_ops=3)
    plan = policy.sample(100, 32, 32, torch.Generator().manual_seed(0))
    assert len(plan.stages) == 3 and all((ids >= 0).all() for ids in plan.stages)


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="policy"):
        BatchPolicy("augmix")
    with pytest.raises(ValueError, match="magnitude"):
        BatchPolicy("randaugment", magnitude=40)
    with pytest.raises(ValueError, match="num_ops"):
        BatchPolicy("randaugment", num_ops=0)
