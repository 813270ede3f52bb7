"""Small members of every model family, built with the real dividing rules, and shared checks.

Each family builder returns a shallow, narrow network divided into S branches by the
family's own rule (the registered builders' spec functions), so the tests exercise the
same block types, shortcuts, groups and divided widths as the full-size models at a
fraction of the cost.  ImageNet specs are additionally narrowed 4x (after dividing) and
take 40x40 inputs: large enough that train-mode BN in the last stage (2x2 maps) is not
ill-conditioned, which would amplify rounding differences between convolution
algorithms past the 1e-5 tolerance.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import Tensor, nn

from divco.models.base import BranchBatchedNetwork
from divco.models.cifar_resnet import (
    BranchBatchedCifarResNet,
    bottleneck_resnet_spec,
    resnext29_spec,
    wide_resnet_spec,
)
from divco.models.imagenet_resnet import BranchBatchedResNet, resnet_spec, resnext_spec
from divco.models.imagenet_resnet import wide_resnet_spec as imagenet_wide_resnet_spec
from divco.models.pyramidnet import BranchBatchedPyramidNet, pyramidnet_spec
from divco.nn import BranchBatchNorm2d, BranchConv2d, BranchLinear

NUM_CLASSES = 5
BATCH = 3


def _narrow(spec, factor: int = 4):
    return replace(spec, stem_width=spec.stem_width // factor, widths=tuple(w // factor for w in spec.widths))


def _cifar(make_spec) -> Callable[[int], BranchBatchedNetwork]:
    return lambda S: BranchBatchedCifarResNet(make_spec(S), S)


def _imagenet(make_spec) -> Callable[[int], BranchBatchedNetwork]:
    return lambda S: BranchBatchedResNet(_narrow(make_spec(S)), S)


# family -> (builder(S) -> model, input height/width)
FAMILIES: dict[str, tuple[Callable[[int], BranchBatchedNetwork], int]] = {
    "wide_resnet": (_cifar(lambda S: wide_resnet_spec(16, 2, NUM_CLASSES, S)), 8),
    "resnet_bottleneck": (_cifar(lambda S: bottleneck_resnet_spec(11, NUM_CLASSES, S)), 8),
    "se_resnet": (_cifar(lambda S: bottleneck_resnet_spec(11, NUM_CLASSES, S, se=4)), 8),
    "resnext29": (
        _cifar(lambda S: replace(resnext29_spec(4, 16, NUM_CLASSES, S), layers=(1, 1, 1), stem_width=16,
                                 widths=(16, 32, 64))),
        8,
    ),
    # ShakeDrop off: its gates are random, so train-mode outputs could not be compared.
    "pyramidnet": (
        lambda S: BranchBatchedPyramidNet(pyramidnet_spec(20, 12, NUM_CLASSES, S, final_shakedrop_p=0.0), S),
        8,
    ),
    "imagenet_basic": (_imagenet(lambda S: resnet_spec("basic", (2, 1, 1, 1), NUM_CLASSES, S)), 40),
    "imagenet_bottleneck": (_imagenet(lambda S: resnet_spec("bottleneck", (2, 1, 1, 1), NUM_CLASSES, S)), 40),
    "imagenet_resnext": (_imagenet(lambda S: resnext_spec((2, 1, 1, 1), 32, 4, NUM_CLASSES, S)), 40),
    "imagenet_wide_resnet": (_imagenet(lambda S: imagenet_wide_resnet_spec((2, 1, 1, 1), 2, NUM_CLASSES, S)), 40),
}

BRANCH_COUNTS = (1, 2, 3, 4)


@torch.no_grad()
def randomize_(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and running statistics and a random classifier.

    The default initialisation zeroes the last BN of every residual path and starts
    BN at the identity, which would hide mistakes in residual paths and in the use
    of running statistics.
    """
    for m in model.modules():
        if isinstance(m, BranchBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
        elif isinstance(m, BranchLinear):
            m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
            m.bias.normal_(0.0, 0.1)
        elif isinstance(m, BranchConv2d) and m.bias is not None:
            m.bias.normal_(0.0, 0.1)
    return model


def build(family: str, S: int) -> tuple[BranchBatchedNetwork, int]:
    make, size = FAMILIES[family]
    return randomize_(make(S)), size


def set_conv_impl(model: nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, BranchConv2d):
            m.impl = impl


def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


def assert_gradients_close(actual: dict[str, Tensor], expected: dict[str, Tensor], tol: float, what: str) -> None:
    """Gradients equal up to ``tol``, relative to each tensor's norm or to the typical gradient.

    Some gradients are zero in exact arithmetic (a BN bias followed by a train-mode BN
    that subtracts it again) and come out as rounding noise, which no relative
    tolerance bounds; a wrong gradient is off by about the typical gradient entry.
    """
    typical = torch.cat([g.detach().double().flatten() for g in expected.values()]).pow(2).mean().sqrt()
    for name, e in expected.items():
        a = actual[name]
        assert a is not None, f"{what}: {name} got no gradient"
        assert a.shape == e.shape, f"{what} of {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        error = (a.detach().double() - e.detach().double()).norm()
        bound = tol * (e.detach().double().norm() + typical * e.numel() ** 0.5)
        assert error <= bound, f"{what} of {name}: error {error:.2e} > {bound:.2e} (relative {tol:.0e})"


def branch_logits(parts: list[nn.Module], x: Tensor, per_view: bool) -> Tensor:
    """[N, S, K] from S standalone models (divco S=1 models give [N, 1, K], torchvision [N, K])."""
    outputs = [part(x[:, s] if per_view else x) for s, part in enumerate(parts)]
    return torch.stack([o.reshape(o.shape[0], -1) for o in outputs], dim=1)


def stacked(tensors: list[Tensor]) -> Tensor:
    """The branch-batched layout of S per-branch tensors (dim-0 concatenation)."""
    return torch.cat(tensors, dim=0)


_INITIALISERS = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "ones_", "zeros_", "constant_")


@contextlib.contextmanager
def shapes_only(device: str = "meta") -> Iterator[None]:
    """Build modules without running their initialisers: for shapes and counts only.

    On the meta device (the default) nothing is allocated.  Random initialisers on
    meta tensors still run through Python decompositions, which takes seconds for the
    largest networks, and so do meta forward passes through BN; ``device="cpu"``
    allocates uninitialised weights instead, for a cheap real forward of the shapes.
    """
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device(device):
            yield
    finally:
        for name, initialiser in saved.items():
            setattr(nn.init, name, initialiser)
