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


def test_every_registered_name_is_spelled_out_in_the_source():
    """Each name is findable with grep (an explicit table, as timm's explicit functions)."""
    from pathlib import Path

    source = "\n".join(p.read_text() for p in Path(divco.models.__file__).parent.glob("*.py"))
    missing = [name for name in divco.models.list() if f'"{name}"' not in source]
    assert not missing, f"names built by string formatting only: {missing}"


@pytest.mark.parametrize("name", ["wide_resnet16_8", "resnet110", "resnext29_8x64d", "pyramidnet164", "resnet50",
                                  "resnext50_32x4d", "resnet50_d"])
def test_unknown_keyword_arguments_are_rejected_once_in_create(name):
    entry = divco.models.get_entry(name)
    with pytest.raises(ValueError, match=rf"unexpected keyword argument\(s\) \['colour'\] for model '{name}'; "
                                         rf"it takes: {', '.join(entry.options())}"):
        divco.models.create(name, colour="red")


def test_builders_must_name_their_options():
    with pytest.raises(ValueError, match="must name its options"):
        registry.register("toy_net", family="cifar", default_num_classes=10, input_size=(3, 32, 32))(
            lambda num_classes, branches=1, **kw: None)


@pytest.mark.parametrize("name, S, limit", [
    ("wide_resnet28_10", 1000, registry.MAX_BRANCHES), ("resnet50", 65, registry.MAX_BRANCHES),
    ("resnext29_8x64d", 9, 8), ("resnext101_64x4d_d", 65, 64),
])
def test_branches_beyond_the_family_limit_are_rejected_before_allocating(name, S, limit, monkeypatch):
    entry = divco.models.get_entry(name)

    def must_not_build(**kwargs):
        raise AssertionError("allocated before validating branches")

    monkeypatch.setitem(registry._REGISTRY, name, registry.ModelEntry(
        entry.name, entry.family, must_not_build, entry.default_num_classes, entry.input_size, entry.description,
        entry.max_branches))
    with pytest.raises(ValueError, match=rf"branches must be between 1 and {limit} for model '{name}'.*got {S}"):
        divco.models.create(name, branches=S)


def test_undivided_branches_are_limited_by_max_branches_only():
    with torch.device("meta"):
        assert divco.models.create("resnext29_8x64d", branches=16, divide=False).branches == 16
    assert divco.models.MAX_BRANCHES == 64


def test_float64_or_empty_input_gives_a_clear_error():
    model = divco.models.create("wide_resnet16_2", num_classes=3, branches=2).eval()
    with pytest.raises(ValueError, match=r"has torch.float32 weights and got a torch.float64 input"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expects images of at least 1x1 pixels, got 0x0"):
        model(torch.zeros(1, 3, 0, 0))
    with pytest.raises(ValueError, match=r"at least 1x1 pixels, got 0x4"):
        model(torch.zeros(1, 2, 3, 0, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast mixes dtypes by design
        assert model(torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16)).shape == (1, 2, 3)


def test_readme_documents_set_conv_impl_as_the_api_takes_it():
    import inspect
    from pathlib import Path

    readme = (Path(divco.__file__).parent.parent / "README.md").read_text()
    assert list(inspect.signature(divco.nn.set_conv_impl).parameters) == ["module", "impl"]
    assert 'set_conv_impl(model, "grouped" | "split" | "auto")' in readme
    assert 'set_conv_impl("grouped"' not in readme


def test_models_do_not_import_higher_layers():
    """The model layer imports neither divco.stacking nor divco.train."""
    import ast
    from pathlib import Path

    for path in Path(divco.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("stacking", "train")) or node.level == 0, (path.name, node.module)
                assert not (node.level == 2 and node.module.split(".")[0] in ("stacking", "train")), path.name


@pytest.mark.parametrize("name", [None, 3, b"resnet18"])
def test_a_name_that_is_not_a_string_is_a_value_error(name):
    with pytest.raises(ValueError, match=rf"model name must be a str .*got {name!r}"):
        divco.models.create(name)


def test_the_branch_limit_is_one_check():
    registry.check_branch_count(registry.MAX_BRANCHES)
    with pytest.raises(ValueError, match=r"between 1 and 64 \(divco supports at most MAX_BRANCHES = 64"):
        registry.check_branch_count(registry.MAX_BRANCHES + 1)


@pytest.mark.parametrize("name, branches, stem, width_per_group, described", [
    ("wide_resnet50_2", 2, 64, 64, "(S=2, 3: k'=1)"),
    ("wide_resnet50_2", 3, 64, 64, "(S=2, 3: k'=1)"),
    ("wide_resnet50_2", 4, 32, 128, "base width 64 -> 32/24 for S=4/8"),
    ("wide_resnet50_2_d", 2, 64, 64, "except S=2: base width 64, width per group 64"),
    ("wide_resnet50_3_d", 2, 64, 128, "except S=2: base width 64, width per group 128"),
    ("wide_resnet101_2_d", 2, 44, 128, "base width 64 -> 44/32/24 for S=2/4/8"),
])
def test_divco_models_describes_the_dividing_rule_the_code_applies(name, branches, stem, width_per_group, described):
    """`divco models` prints these descriptions: each states what create builds."""
    import torch

    with torch.device("meta"):
        spec = divco.models.create(name, branches=branches).spec
    assert (getattr(spec, "stem_width", None) or spec.base_width, spec.width_per_group) == (stem, width_per_group)
    description = divco.models.get_entry(name).description
    assert described in description
    if name == "wide_resnet101_2_d":
        assert "except" not in description


def test_pyramidnet_description_names_both_divided_quantities():
    import torch

    with torch.device("meta"):
        one, four = (divco.models.create("pyramidnet164", branches=S).spec for S in (1, 4))
    assert four.alpha == one.alpha / 2 and four.final_shakedrop_p == one.final_shakedrop_p / 2
    assert "alpha and ShakeDrop p / sqrt(S)" in divco.models.get_entry("pyramidnet164").description
