"""The model registry: names, families, defaults, and clear errors for bad arguments."""

from __future__ import annotations

import pytest
import torch

import divco
from divco.models import registry


def test_list_partitions_the_zoo_into_families():
    names = divco.models.list()
    cifar, imagenet = divco.models.list("cifar"), divco.models.list("imagenet")
    assert sorted(cifar + imagenet) == names and not set(cifar) & set(imagenet)
    assert {"pyramidnet164", "pyramidnet272", "resnet50", "wide_resnet50_2", "wide_resnet28_10"} <= set(names)
    with pytest.raises(ValueError, match="family must be 'cifar', 'imagenet' or None, got 'coco'"):
        divco.models.list("coco")


@pytest.mark.parametrize("name, family, classes, size", [
    ("pyramidnet164", "cifar", 10, (3, 32, 32)), ("resnet18", "imagenet", 1000, (3, 224, 224)),
])
def test_entries_carry_family_defaults(name, family, classes, size):
    entry = divco.models.get_entry(name)
    assert (entry.family, entry.default_num_classes, entry.input_size) == (family, classes, size)
    assert entry.description
    with torch.device("meta"):
        model = divco.models.create(name)
    assert model.num_classes == classes and model.family == family and model.model_name == name


@pytest.mark.parametrize("typo, closest", [("resnet5", "resnet50"), ("pyramidnet200", "pyramidnet272"),
                                           ("wide_resnet50", "wide_resnet50_2"), ("resnext50", "resnext50_32x4d")])
def test_unknown_name_lists_the_closest_names(typo, closest):
    with pytest.raises(ValueError, match=rf"unknown model '{typo}'; closest: .*\b{closest}\b"):
        divco.models.create(typo)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "10", None])
def test_bad_num_classes_and_branches(value):
    if value is not None:
        with pytest.raises(ValueError, match=rf"num_classes must be a positive int, got {value!r}"):
            divco.models.create("resnet18", num_classes=value)
    with pytest.raises(ValueError, match=rf"branches must be a positive int, got {value!r}"):
        divco.models.create("pyramidnet164", branches=value)


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="model 'resnet50' is already registered"):
        registry.register("resnet50", family="imagenet", default_num_classes=1000, input_size=(3, 224, 224))(
            lambda **kw: None)
