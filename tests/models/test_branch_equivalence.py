"""Every model family: the branch-batched network IS its S unstacked branches.

For each family and S in {1, 2, 3, 4}, in every execution (all branches at once with
grouped or split convolutions, or one branch at a time) and for both input kinds (one
image for all branches, or one view per branch): outputs in train and eval mode,
gradients of the input and of every parameter slice, and the whole state (weights and
BN running statistics) after an SGD step equal those of the S standalone networks that
``divco.unstack`` returns.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_matrix import (
    BATCH,
    BRANCH_COUNTS,
    FAMILIES,
    assert_close,
    assert_gradients_close,
    branch_logits,
    build,
    randomize_,
    set_conv_impl,
    stacked,
)
from optional_deps import TORCHVISION_MISSING, needs_torchvision

import divco
from divco.models.cifar_resnet import BranchBatchedCifarResNet, wide_resnet_spec
from divco.models.pyramidnet import BranchBatchedPyramidNet, pyramidnet_spec

TOL = 1e-5  # fp32 forward, relative (norm-wise)
TOL64 = 1e-9  # float64 gradients and training steps

EXECUTIONS = [("batched", "grouped"), ("batched", "split"), ("per_branch", None)]


def _cases():
    for family, S in itertools.product(FAMILIES, BRANCH_COUNTS):
        # With one branch every execution is the same computation: test it once.
        for execution, impl in EXECUTIONS[:1] if S == 1 else EXECUTIONS:
            yield pytest.param(family, S, execution, impl, id=f"{family}-S{S}-{execution}{'-' + impl if impl else ''}",
                               marks=[needs_torchvision] if family.startswith("imagenet") else [])


def _device(model):
    return next(model.parameters()).device


def _inputs(model, size: int, per_view: bool, dtype=torch.float32):
    S = model.branches
    shape = (BATCH, S, 3, size, size) if per_view else (BATCH, 3, size, size)
    return torch.randn(shape, dtype=dtype, device=_device(model))


def _set_mode(train: bool, model, parts) -> None:
    model.train(train)
    for part in parts:
        part.train(train)


@torch.no_grad()
def _check_fp32_forward(model, parts, size: int) -> None:
    for train, per_view in itertools.product((True, False), (True, False)):
        _set_mode(train, model, parts)
        x = _inputs(model, size, per_view)
        what = f"{'train' if train else 'eval'} logits ({'per-branch views' if per_view else 'shared input'})"
        assert_close(model(x), branch_logits(parts, x, per_view), TOL, what)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def _check_training_step(model, parts, size: int, per_view: bool) -> None:
    """Train forward/backward and an SGD step (float64): logits, gradients and the new state equal."""
    S = model.branches
    _set_mode(True, model, parts)
    kind = "per-branch views" if per_view else "shared input"
    x = _inputs(model, size, per_view, torch.float64).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    weights = torch.randn(BATCH, S, model.num_classes, dtype=torch.float64, device=_device(model))

    logits = model(x)
    expected = branch_logits(parts, x_ref, per_view)
    assert_close(logits, expected, TOL64, f"{kind}: train logits")
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    assert_close(x.grad, x_ref.grad, TOL64, f"{kind}: input gradient")
    part_params = [dict(p.named_parameters()) for p in parts]
    assert_gradients_close(
        {name: p.grad for name, p in model.named_parameters()},
        {name: stacked([pp[name].grad for pp in part_params]) for name, _ in model.named_parameters()},
        TOL64, f"{kind}: gradient",
    )

    # an SGD step: weights, and the BN running statistics of the forward pass, equal
    for optimizer in (_sgd(model.parameters()), _sgd(itertools.chain.from_iterable(p.parameters() for p in parts))):
        optimizer.step()
        optimizer.zero_grad()
    part_states = [p.state_dict() for p in parts]
    for key, value in model.state_dict().items():
        if value.dim() == 0:  # num_batches_tracked: shared, counts each batch once
            assert all(torch.equal(value, s[key]) for s in part_states), key
        else:
            assert_close(value, stacked([s[key] for s in part_states]), TOL64, f"{kind}: {key} after a step")


@pytest.mark.parametrize("family, S, execution, impl", list(_cases()))
def test_batched_network_equals_unstacked_branches(family, S, execution, impl):
    """fp32 forward to 1e-5; gradients and SGD steps in float64.

    Gradients are compared in float64 because a ReLU input within fp32 rounding of 0
    can have opposite signs in the two computations, which switches that element's
    whole gradient on or off and moves every gradient upstream by ~1e-3: a true
    discontinuity, not an inaccuracy.  float64 makes it vanishingly unlikely.
    """
    model, size = build(family, S)
    model.execution = execution
    if impl is not None:
        set_conv_impl(model, impl)
    parts = divco.unstack(model)
    model64, parts64 = copy.deepcopy((model, parts))
    _check_fp32_forward(model, parts, size)

    model64.double()
    for part in parts64:
        part.double()
    _check_training_step(model64, parts64, size, per_view=True)
    _check_training_step(model64, parts64, size, per_view=False)  # a second step, from the first one's state
    _set_mode(False, model64, parts64)
    with torch.no_grad():
        x = _inputs(model64, size, True, torch.float64)
        assert_close(model64(x), branch_logits(parts64, x, True), TOL64, "eval logits after two steps")


@pytest.mark.parametrize("S", BRANCH_COUNTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_channels_last_and_bf16_autocast_agree_with_fp32(family, S):
    model, size = build(family, S)
    x = torch.randn(BATCH, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    # Every S all branches at once; one-branch-at-a-time once (S=2): it slices the same layouts.
    for execution in ("batched", "per_branch") if S == 2 else ("batched",):
        model.execution = execution
        reference = copy.deepcopy(model)
        fast = copy.deepcopy(model).to(memory_format=torch.channels_last)

        with torch.no_grad():
            # channels_last fp32: train and eval forward
            for train in (True, False):
                reference.train(train)
                fast.train(train)
                assert_close(fast(x_cl), reference(x), 1e-4, f"{execution} channels_last logits (train={train})")

            # bf16 autocast (the CPU's mixed precision) in channels_last
            stem_dtypes = []
            hook = fast.conv1.register_forward_hook(lambda m, i, out, seen=stem_dtypes: seen.append(out.dtype))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = fast(x_cl)
            hook.remove()
            assert stem_dtypes[0] == torch.bfloat16, "autocast did not reach the convolutions"
            assert_close(low.float(), reference(x), 5e-2, f"{execution} bf16 autocast eval logits")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast.train()(x_cl)
        low.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in fast.parameters())

        # channels_last gradients (float64: see test_batched_network_equals_unstacked_branches)
        reference.double().train()
        fast.double().zero_grad()
        weights = torch.randn(BATCH, S, model.num_classes, dtype=torch.float64)
        (reference(x.double()) * weights).sum().backward()
        (fast(x_cl.double()) * weights).sum().backward()
        assert_gradients_close({n: p.grad for n, p in fast.named_parameters()},
                               {n: p.grad for n, p in reference.named_parameters()}, TOL64,
                               f"{execution} channels_last gradient")


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(["pyramidnet", "resnext29"] + ([] if TORCHVISION_MISSING else ["imagenet_basic"])),
       S=st.integers(1, 4),
       n=st.integers(1, 3), h=st.integers(5, 13), w=st.integers(5, 13), per_view=st.booleans(),
       execution=st.sampled_from(["batched", "per_branch"]))
def test_random_input_shapes(family, S, n, h, w, per_view, execution):
    """Odd and tiny spatial sizes (ceil-mode pooling, padded shortcuts, 1x1 maps), any batch size."""
    model, _ = build(family, S)
    model.eval().execution = execution
    parts = divco.unstack(model)
    x = torch.randn((n, S, 3, h, w) if per_view else (n, 3, h, w))
    with torch.no_grad():
        assert_close(model(x), branch_logits(parts, x, per_view), TOL, "eval logits")


def test_torch_compile_matches_eager():
    """torch.compile traces both executions into one graph each (no breaks) with eager's results.

    The CPU test uses the aot_eager backend: it runs Dynamo and AOTAutograd, where
    graph breaks and tracing errors in divco's code would show, without the minutes
    that Inductor's C++ compilation of a whole network takes on a 2-core machine.
    Inductor itself is checked on the GPU (below).
    """
    for execution in ("batched", "per_branch"):
        model = randomize_(BranchBatchedCifarResNet(wide_resnet_spec(10, 2, 5, 2), 2, execution=execution))
        compiled_model = copy.deepcopy(model)
        compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
        x = torch.randn(BATCH, 2, 3, 8, 8)
        weights = torch.randn(BATCH, 2, model.num_classes)
        out, out_c = model(x), compiled(x)
        assert_close(out_c, out, 1e-6, f"{execution}: compiled train logits")
        (out * weights).sum().backward()
        (out_c * weights).sum().backward()
        assert_gradients_close({n: p.grad for n, p in compiled_model.named_parameters()},
                               {n: p.grad for n, p in model.named_parameters()}, 1e-5,
                               f"{execution}: compiled gradient")
        for key, value in model.state_dict().items():
            assert_close(compiled_model.state_dict()[key].float(), value.float(), 1e-6, f"{execution}: {key}")


def test_torch_compile_traces_shakedrop_and_padded_shortcuts():
    """PyramidNet in training (random per-branch gates, custom backward) compiles without graph breaks.

    Its random gates differ from eager's draws, so only shapes and finiteness are compared.
    """
    model = BranchBatchedPyramidNet(pyramidnet_spec(11, 6, 5, 2), 2, execution="batched")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    logits = compiled(torch.randn(BATCH, 2, 3, 8, 8))
    logits.sum().backward()
    assert logits.shape == (BATCH, 2, 5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_batched_equals_unstacked(family):
    """On the GPU (cuDNN's grouped convolutions), in float64 so TF32 cannot blur the comparison."""
    model, size = build(family, 3)
    model = model.cuda().double()
    for execution in ("batched", "per_branch"):
        model.execution = execution
        batched, parts = copy.deepcopy(model), divco.unstack(model)
        _check_training_step(batched, parts, size, per_view=True)
        _check_training_step(batched, parts, size, per_view=False)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["wide_resnet", "pyramidnet", "imagenet_resnext"])
def test_inductor_on_cuda_matches_eager(family):
    model, size = build(family, 4)
    model = model.cuda().double()
    for execution in ("batched", "per_branch"):
        model.execution = execution
        compiled_model = copy.deepcopy(model)
        compiled = torch.compile(compiled_model, fullgraph=True)
        x = torch.randn(BATCH, 4, 3, size, size, device="cuda", dtype=torch.float64)
        out, out_c = model(x), compiled(x)
        assert_close(out_c, out, 1e-9, f"{execution}: inductor train logits")
        out.sum().backward()
        out_c.sum().backward()
        assert_gradients_close({n: p.grad for n, p in compiled_model.named_parameters()},
                               {n: p.grad for n, p in model.named_parameters()}, 1e-9,
                               f"{execution}: inductor gradient")
        model.eval()
        compiled_model.eval()
        with torch.no_grad():
            assert_close(compiled(x), model(x), 1e-9, f"{execution}: inductor eval logits")
        model.train()


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bad_input_names_expected_and_received(family):
    model, size = build(family, 2)
    with pytest.raises(ValueError, match=r"expects 3 input channels .*got shape \(2, 4, "):
        model(torch.randn(2, 4, size, size))
    with pytest.raises(ValueError, match=r"has 2 branch\(es\) and expects one view per branch .*got 3 views"):
        model(torch.randn(2, 3, 3, size, size))
    with pytest.raises(ValueError, match=r"expects 3 input channels \(\[N, 2, 3, H, W\]\)"):
        model(torch.randn(2, 2, 1, size, size))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\] or \[N, 2, 3, H, W\] input, got a 3-D tensor"):
        model(torch.randn(3, size, size))
    with pytest.raises(ValueError, match="floating-point input, got dtype torch.int64"):
        model(torch.zeros(2, 3, size, size, dtype=torch.long))
    with pytest.raises(ValueError, match="execution must be one of"):
        model.execution = "parallel"
