"""TrainStep: the same update as a hand-written step; metrics summed on the device; no host sync."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import divco
import divco.ops
from divco.train import RunningMetrics, TrainStep
from divco.train.recipe import parameter_groups


def small_model(S: int = 2):
    return divco.models.create("wide_resnet16_4", num_classes=5, branches=S)


def optimizer_for(model):
    return torch.optim.SGD(parameter_groups(model, 1e-4), lr=0.05, momentum=0.9, nesterov=True)


def test_step_equals_a_hand_written_update():
    torch.manual_seed(0)
    model = small_model()
    reference = copy.deepcopy(model)
    images = torch.randn(6, 2, 3, 8, 8)
    targets = torch.softmax(torch.randn(6, 5), -1)  # soft targets, as with mixup
    step = TrainStep(model, optimizer_for(model), cot_weight=torch.tensor(0.3), backend="torch")
    out = step(images, targets)

    ref_opt = optimizer_for(reference)
    logits = reference(images).double()
    p = F.softmax(logits, -1)
    ce = -(targets.double()[:, None] * F.log_softmax(logits, -1)).sum(-1).mean(0)  # [S]
    p_mean = p.mean(1)
    js = (-(p_mean * p_mean.log()).sum(-1) + (p * p.log()).sum(-1).mean(1)).mean()
    loss = ce.sum() + 0.3 * js
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_metrics_accumulate_and_read_once():
    model = small_model()
    step = TrainStep(model, optimizer_for(model), cot_weight=torch.tensor(0.5), backend="torch")
    outs = []
    for n in (4, 6):
        outs.append((n, step(torch.randn(n, 2, 3, 8, 8), torch.randint(0, 5, (n,)))))
    read = step.metrics.read()
    total = sum(n for n, _ in outs)
    assert read["train_images"] == total
    assert read["train_loss"] == pytest.approx(sum(n * o.loss.item() for n, o in outs) / total)
    assert read["train_ce"][1] == pytest.approx(sum(n * o.ce[1].item() for n, o in outs) / total)
    assert read["train_cot"] == pytest.approx(sum(n * o.cot.item() for n, o in outs) / total)
    assert read["train_ensemble_acc"] == sum(o.correct[-1].item() for _, o in outs) / total
    saved = step.metrics.state_dict()
    restored = RunningMetrics(2, torch.device("cpu"))
    restored.load_state_dict(saved)
    assert restored.read() == read
    step.metrics.reset()
    with pytest.raises(ValueError, match="no training images"):
        step.metrics.read()


def test_cot_weight_must_be_a_tensor():
    model = small_model()
    with pytest.raises(ValueError, match="cot_weight must be a 0-dim tensor"):
        TrainStep(model, optimizer_for(model), cot_weight=0.5)


@pytest.mark.gpu
def test_cuda_step_never_synchronises():
    device = torch.device("cuda")
    model = small_model(4).to(device).to(memory_format=torch.channels_last)
    cot_weight = torch.tensor(0.5, device=device)
    step = TrainStep(model, optimizer_for(model), cot_weight=cot_weight, amp_dtype=torch.bfloat16)
    images = torch.randn(32, 4, 3, 32, 32, device=device)
    targets = torch.softmax(torch.randn(32, 5, device=device), -1)
    step(images, targets)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cot_weight.fill_(0.25)
            step(images, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.metrics.read()["train_images"] == 32 * 4
