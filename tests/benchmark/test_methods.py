"""The benchmark's methods compute the same training step (divco.benchmark.methods, .steps)."""

import copy

import pytest
import torch

import divco
import divco.ops
from divco.benchmark.methods import (
    MethodUnavailable,
    Workload,
    build_method,
    official_cotrain_loss,
    packed_ensemble,
)
from divco.benchmark.steps import MethodInferStep, MethodTrainStep, Variant

MODEL = "wide_resnet16_4"


def _workload(branches=2, size=8, classes=10):
    return Workload(MODEL, branches, classes, size, torch.device("cpu"))


def _branch_params(method, s):
    """Branch s's parameters by standalone name, from any of the divided methods."""
    if method.name.startswith("divco"):
        return divco.branch_state_dict(method.model, s)
    if method.name == "loop":
        return {k: v.detach() for k, v in method.models[s].state_dict().items()}
    if method.name == "vmap":
        state = {**method.params, **method.buffers}
        return {k: v[s].detach() for k, v in state.items()}
    raise AssertionError(method.name)


def test_official_loss_is_divcos_objective():
    """The loop's plain-PyTorch loss (official SplitNet formula) equals divco.ops.cotrain_loss."""
    logits = torch.randn(6, 3, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (6,))
    official = official_cotrain_loss(list(logits.unbind(1)), target, 0.5)
    fused = divco.ops.cotrain_loss(logits, target, weight=0.5, backend="torch").loss
    torch.testing.assert_close(official.to(fused.dtype), fused, rtol=1e-6, atol=1e-6)
    one = official_cotrain_loss([logits[:, 0]], target, 0.5)  # S=1: cross-entropy alone
    torch.testing.assert_close(one, torch.nn.functional.cross_entropy(logits[:, 0], target))


def test_divided_methods_take_the_same_training_step():
    """Same weights, same views: same loss and the same weights after one SGD step."""
    torch.manual_seed(0)
    workload = _workload()
    divided = divco.models.create(MODEL, num_classes=10, branches=2)
    names = ("divco-batched", "divco-per-branch", "loop", "vmap")
    methods = {n: build_method(n, workload, divided) for n in names}
    images, target = methods["loop"].train_inputs(4, torch.Generator().manual_seed(3))
    losses = {}
    for name, method in methods.items():
        method.train()
        losses[name] = method.forward_loss(images, target).item()
        step = MethodTrainStep(method, images, target, Variant())
        step()
    for name in names[1:]:
        assert losses[name] == pytest.approx(losses["loop"], rel=1e-5), name
    for s in range(2):
        reference = _branch_params(methods["loop"], s)
        for name in ("divco-batched", "divco-per-branch", "vmap"):
            state = _branch_params(methods[name], s)
            assert state.keys() == reference.keys()
            for key, value in reference.items():
                torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-4, atol=1e-5,
                                           msg=f"{name} branch {s} {key}")
    # and the step changed the weights (a test that cannot pass by doing nothing)
    assert not torch.equal(_branch_params(methods["loop"], 0)["conv1.weight"], divco.branch_state_dict(divided, 0)[
        "conv1.weight"])


def test_inference_is_the_mean_of_the_branch_logits():
    torch.manual_seed(0)
    workload = _workload()
    divided = divco.models.create(MODEL, num_classes=10, branches=2).eval()
    images = torch.randn(3, 3, 8, 8)
    expected = divided(images).mean(1)
    for name in ("divco-batched", "divco-per-branch", "loop", "vmap"):
        method = build_method(name, workload, divided).train(False)
        with torch.no_grad():
            torch.testing.assert_close(method.forward_infer(images), expected, rtol=1e-5, atol=1e-5, msg=name)
        MethodInferStep(method, images, Variant())()  # the timed callable runs


def test_undivided_is_the_s1_network():
    method = build_method("undivided", _workload(branches=4))
    assert method.workload.branches == 4 and method.model.branches == 1
    images, target = method.train_inputs(2, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8)  # one view: the undivided network sees each image once
    assert method.forward_loss(images, target).dim() == 0


def test_channels_last_views_need_no_copy():
    workload = Workload(MODEL, 2, 10, 8, torch.device("cpu"), channels_last=True)
    method = build_method("divco-batched", workload)
    images, _ = method.train_inputs(2, torch.Generator().manual_seed(0))
    assert images.shape == (2, 2, 3, 8, 8)
    assert images.flatten(1, 2).is_contiguous(memory_format=torch.channels_last)


def test_packed_ensemble_matches_the_divided_width():
    pytest.importorskip("torch_uncertainty", reason="torch-uncertainty is an optional benchmark dependency")
    for model, S, size in (("wide_resnet16_8", 4, 8), ("wide_resnet16_8", 2, 8)):
        workload = Workload(model, S, 10, size, torch.device("cpu"))
        packed = packed_ensemble(workload)
        divided = divco.models.create(model, num_classes=10, branches=S)
        # every estimator is exactly one divided branch wide: same width per stage
        stage_width = divided.spec.widths[-1]
        assert packed.linear.in_features == stage_width  # per group (estimator)
        divco_params = sum(p.numel() for p in divided.parameters())
        packed_params = sum(p.numel() for p in packed.parameters())
        assert abs(packed_params - divco_params) / divco_params < 0.05, (model, S, packed_params, divco_params)
        method = build_method("packed", workload)
        images, target = method.train_inputs(2, torch.Generator().manual_seed(0))
        assert method._logits(images).shape == (S, 2, 10)
        assert torch.isfinite(method.forward_loss(images, target))


def test_packed_without_a_counterpart_is_unavailable():
    pytest.importorskip("torch_uncertainty", reason="torch-uncertainty is an optional benchmark dependency")
    with pytest.raises(MethodUnavailable, match="resnet110"):
        packed_ensemble(Workload("resnet110", 2, 10, 8, torch.device("cpu")))


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown benchmark method 'fast'.*loop"):
        build_method("fast", _workload())


def test_divided_methods_leave_the_given_model_alone():
    divided = divco.models.create(MODEL, num_classes=10, branches=2)
    before = copy.deepcopy(divided.state_dict())
    method = build_method("divco-batched", _workload(), divided)
    images, target = method.train_inputs(2, torch.Generator().manual_seed(0))
    MethodTrainStep(method, images, target, Variant())()
    for key, value in divided.state_dict().items():
        assert torch.equal(value, before[key]), key
