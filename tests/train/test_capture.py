"""Whole-step capture: compile-step is one graph and computes what the eager step computes; cuda-graph on GPUs."""

from __future__ import annotations

import pytest
import torch

import divco
import divco.train.capture as capture
from divco.train import TrainStep
from divco.train.capture import CAPTURE_MODES, LearningRates, check_capture, sgd_step_
from divco.train.recipe import parameter_groups
from divco.train.schedules import WarmupCosineSchedule

needs_traced_autograd = pytest.mark.skipif(not capture.traces_autograd(),
                                           reason="this torch's dynamo does not trace autograd")


def cifar_resnet(S: int = 2):
    torch.manual_seed(0)
    return divco.models.create("wide_resnet16_1", num_classes=5, branches=S)


def sgd_run(model, mode: str, *, skip: bool = False, device: str = "cpu"):
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
    schedule = WarmupCosineSchedule(optimizer, base_lr=0.1, total_steps=8, warmup_steps=2, warmup_start_lr=0.01,
                                    min_lr=1e-4)  # the rate changes every step
    return TrainStep(model, optimizer, cot_weight=torch.tensor(0.5, device=device), scheduler=schedule,
                     capture=mode, on_nonfinite="skip-step" if skip else "stop")


def batches(n: int, device: str = "cpu", size: int = 8):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 2, 3, size, size, generator=generator).to(device),
             torch.randint(0, 5, (4,), generator=generator).to(device)) for _ in range(n)]


def test_capture_modes_are_validated():
    assert check_capture("none", compile=True) == "compile"
    with pytest.raises(ValueError, match="capture must be one of"):
        check_capture("graph")
    with pytest.raises(ValueError, match="contradicts capture='cuda-graph'"):
        check_capture("cuda-graph", compile=True)
    assert set(CAPTURE_MODES) == {"none", "compile", "compile-step", "cuda-graph"}


def test_cuda_graph_capture_needs_a_cuda_device():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        sgd_run(cifar_resnet(), "cuda-graph")


@needs_traced_autograd
def test_whole_step_is_one_graph_without_breaks():
    """forward, co-training loss, backward and the SGD step of a divided CIFAR ResNet (S=2) in one graph."""
    step = sgd_run(cifar_resnet(), "compile-step")
    whole = step._captured
    images, targets = batches(1)[0]
    step(images, targets)  # the eager first step: gradients and momentum buffers exist after it
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(whole.whole_step)(images, targets, None)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@needs_traced_autograd
def test_compiled_step_equals_the_eager_step(monkeypatch):
    monkeypatch.setattr(capture, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    data = batches(4)
    eager, compiled = cifar_resnet(), cifar_resnet()
    runs = {"none": sgd_run(eager, "none"), "compile-step": sgd_run(compiled, "compile-step")}
    for images, targets in data:
        for step in runs.values():
            step(images, targets)
    assert counters["stats"]["unique_graphs"] == 1  # a new learning rate every step, never a recompile
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    eager_state, compiled_state = (s.optimizer.state_dict()["state"] for s in runs.values())
    for key in eager_state:
        torch.testing.assert_close(compiled_state[key]["momentum_buffer"], eager_state[key]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
    assert [g["lr"] for g in runs["compile-step"].optimizer.param_groups] == \
        [g["lr"] for g in runs["none"].optimizer.param_groups]  # floats again, as the schedule wrote them
    read = {mode: step.metrics.read() for mode, step in runs.items()}
    assert read["compile-step"]["train_images"] == read["none"]["train_images"] == 16
    assert read["compile-step"]["train_loss"] == pytest.approx(read["none"]["train_loss"], rel=1e-5)
    assert read["compile-step"]["train_branch_acc"] == read["none"]["train_branch_acc"]


@needs_traced_autograd
def test_compiled_step_counts_a_nonfinite_step_on_the_device(monkeypatch):
    monkeypatch.setattr(capture, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    model = cifar_resnet()
    step = sgd_run(model, "compile-step", skip=True)
    data = batches(3)
    data[2] = (torch.full_like(data[2][0], float("nan")), data[2][1])
    for images, targets in data[:2]:
        step(images, targets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(*data[2])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)  # the bad step was not applied
    read = step.metrics.read()
    assert read["train_nonfinite_steps"] == 1 and read["train_first_nonfinite_step"] == 3


def test_sgd_with_tensor_rates_equals_torch_sgd():
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(7)]
    groups = [dict(weight_decay=1e-2, momentum=0.9, nesterov=True, dampening=0.0),
              dict(weight_decay=0.0, momentum=0.8, nesterov=False, dampening=0.1, maximize=True)]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    make = lambda ps: torch.optim.SGD([{"params": [p], **g} for p, g in zip(ps, groups)], lr=0.05)  # noqa: E731
    opt_ours, opt_theirs = make(ours), make(theirs)
    rates = LearningRates(opt_ours, torch.device("cpu"))
    for i in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        for opt in (opt_ours, opt_theirs):
            for group in opt.param_groups:
                group["lr"] = 0.05 * (i + 1)
        if i == 0:
            opt_ours.step()  # the eager warm-up step creates the momentum buffers
        else:
            rates.load()
            sgd_step_(opt_ours, rates.tensors)
            rates.unload()
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_running_metrics_count_steps_on_the_device():
    """A captured step replays the metric sums: their step counter must be a device tensor, not a Python int."""
    step = sgd_run(cifar_resnet(), "none")
    assert isinstance(step.metrics.steps, torch.Tensor)
    sums = step.metrics.sums
    step.metrics.reset()
    assert step.metrics.sums is sums  # zeroed in place: a CUDA graph keeps writing into the same tensors


# -- CUDA (skipped without a GPU) ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("skip", [False, True], ids=["stop", "skip-step"])
def test_cuda_graph_step_equals_the_eager_step(skip):
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    data = batches(6, "cuda", size=16)
    eager, graphed = cifar_resnet().cuda(), cifar_resnet().cuda()
    runs = {"none": sgd_run(eager, "none", skip=skip, device="cuda"),
            "cuda-graph": sgd_run(graphed, "cuda-graph", skip=skip, device="cuda")}
    for images, targets in data:  # 3 warm-up steps, the captured one, 2 replays
        for step in runs.values():
            step(images, targets)
    assert runs["cuda-graph"]._captured.graph is not None
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    read = {mode: step.metrics.read() for mode, step in runs.items()}
    assert read["cuda-graph"]["train_images"] == 24
    assert read["cuda-graph"]["train_loss"] == pytest.approx(read["none"]["train_loss"], rel=1e-4)


@pytest.mark.gpu
def test_cuda_graph_step_never_synchronises_after_capture():
    step = sgd_run(cifar_resnet().cuda(), "cuda-graph", device="cuda")
    data = batches(5, "cuda", size=16)
    for images, targets in data[:4]:  # warm-up and capture
        step(images, targets)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(*data[4])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.metrics.read()["train_images"] == 20


@pytest.mark.gpu
def test_cuda_graph_step_refuses_another_batch_shape():
    step = sgd_run(cifar_resnet().cuda(), "cuda-graph", device="cuda")
    for images, targets in batches(4, "cuda", size=16):
        step(images, targets)
    images, targets = batches(1, "cuda", size=16)[0]
    with pytest.raises(ValueError, match="every batch must have the shape"):
        step(images[:2], targets[:2])


@pytest.mark.gpu
def test_cuda_graph_adam_is_capturable():
    model = cifar_resnet().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = TrainStep(model, optimizer, cot_weight=torch.tensor(0.5, device="cuda"), capture="cuda-graph")
    assert all(g["capturable"] for g in optimizer.param_groups)
    for images, targets in batches(5, "cuda", size=16):
        step(images, targets)
    assert step._captured.graph is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
