"""The CUDA quick bench measures divco-batched's two convolution implementations (divco-grouped, divco-split)."""

import pytest
import torch

import divco
from divco.benchmark.methods import ALL_METHODS, CONV_METHODS, Workload, build_method
from divco.benchmark.plan import default_profile, groups
from divco.benchmark.steps import MethodTrainStep, Variant
from divco.nn import BranchConv2d


def test_cuda_quick_profile_measures_both_convolution_implementations():
    profile = default_profile("cuda", quick=True)
    divided = [g for g in groups(profile) if g.branches > 1 and g.phase == "train"]
    assert divided
    for group in divided:
        assert {"divco-batched", *CONV_METHODS} <= set(group.methods), group.id
    at_one = [g for g in groups(profile) if g.branches == 1]
    assert all(not set(CONV_METHODS) & set(g.methods) for g in at_one)  # S=1: one dense convolution either way


@pytest.mark.parametrize("name, impl", [("divco-grouped", "grouped"), ("divco-split", "split")])
def test_conv_methods_force_one_implementation_and_take_the_same_step(name, impl):
    torch.manual_seed(0)
    workload = Workload("wide_resnet16_1", 2, 10, 8, torch.device("cpu"))
    divided = divco.models.create("wide_resnet16_1", num_classes=10, branches=2)
    methods = {n: build_method(n, workload, divided) for n in ("divco-batched", name)}
    assert name in ALL_METHODS and methods[name].name == name
    assert {m.impl for m in methods[name].model.modules() if isinstance(m, BranchConv2d)} == {impl}
    images, target = methods[name].train_inputs(4, torch.Generator().manual_seed(3))
    for method in methods.values():
        method.train()
        MethodTrainStep(method, images, target, Variant())()
    for (key, a), b in zip(methods["divco-batched"].model.state_dict().items(),
                           methods[name].model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=key)
