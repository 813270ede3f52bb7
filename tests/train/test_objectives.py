"""The objectives a TrainStep minimises: the co-training loss and the per-branch one of independent
networks, against float64 references; the step takes either and refuses a contradiction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import divco
from divco.train.objectives import CotrainingObjective, PerBranchObjective
from divco.train.step import TrainStep

CPU_BACKENDS = [b for b in divco.ops.available_backends() if b != "cuda"]


def per_branch(backend="torch") -> PerBranchObjective:
    return PerBranchObjective(torch.device("cpu"), backend=backend)


@pytest.mark.parametrize("soft", [False, True])
def test_per_branch_loss_is_the_sum_of_branch_cross_entropies(soft):
    g = torch.Generator().manual_seed(0)
    B, S, K = 6, 3, 5
    logits = torch.randn(B, S, K, generator=g, dtype=torch.float64, requires_grad=True)
    if soft:
        targets = torch.softmax(torch.randn(B, S, K, generator=g, dtype=torch.float64), -1)
    else:
        targets = torch.randint(0, K, (B, S), generator=g)
    out = per_branch()(logits, targets)
    expected = [F.cross_entropy(logits[:, s], targets[:, s]) for s in range(S)]
    assert torch.allclose(out.ce.double(), torch.stack(expected).detach())
    assert float(out.cot) == 0.0
    (grad,) = torch.autograd.grad(out.loss, logits)
    (expected_grad,) = torch.autograd.grad(torch.stack(expected).sum(), logits)
    assert torch.allclose(out.loss.double(), torch.stack(expected).sum().detach())
    assert torch.allclose(grad, expected_grad)
    hits = [(logits[:, s].argmax(-1) == (targets[:, s].argmax(-1) if soft else targets[:, s])).sum() for s in range(S)]
    assert out.correct.tolist() == [int(h) for h in hits] + [0]
    with pytest.raises(ValueError, match=r"per-branch targets \[B, S\]"):
        per_branch()(logits, targets[:, 0])
    with pytest.raises(ValueError, match="takes no sample weights"):
        per_branch()(logits, targets, torch.ones(B))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_branch_loss_on_every_backend(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 4, 6, generator=g, requires_grad=True)
    targets = torch.randint(0, 6, (8, 4), generator=g)
    out = per_branch(backend)(logits, targets)
    z = logits.detach().double().requires_grad_()
    expected = sum(F.cross_entropy(z[:, s], targets[:, s]) for s in range(4))
    (grad,) = torch.autograd.grad(out.loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, z)
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert torch.allclose(grad.double(), expected_grad, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cotraining_objective_reads_the_weight_in_place(backend):
    """Σ_s CE_s + w · JS against a float64 reference, with w changed in place after construction."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 3, 5, generator=g, requires_grad=True)
    targets = torch.randint(0, 5, (8,), generator=g)
    weight = torch.tensor(0.0)
    objective = CotrainingObjective(weight, backend=backend)
    weight.fill_(0.7)
    out = objective(logits, targets)
    z = logits.detach().double()
    ce = sum(F.cross_entropy(z[:, s], targets) for s in range(3))
    p = z.softmax(-1)
    m = p.mean(1)
    js = (-(m * m.log()).sum(-1) + (p * p.log()).sum(-1).mean(1)).mean()  # H(mean p) - mean H(p)
    assert float(out.loss.detach()) == pytest.approx(float(ce + 0.7 * js), rel=1e-5)
    assert objective.scores_ensemble and not per_branch().scores_ensemble


def test_the_step_runs_its_objective_and_scores_the_ensemble_only_where_it_has_one():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    class Recording(PerBranchObjective):
        def __call__(self, logits, targets, sample_weight=None):
            seen.append(tuple(targets.shape))
            return super().__call__(logits, targets, sample_weight)

    step = TrainStep(model, optimizer, cot_weight=torch.tensor(0.5), branches=2,
                     objective=Recording(torch.device("cpu")))
    out = step.loss(torch.randn(4, 2, 3), torch.randint(0, 3, (4, 2)))
    assert seen == [(4, 2)] and float(out.cot) == 0.0
    assert step.metrics.ensemble is False
    assert TrainStep(model, optimizer, cot_weight=torch.tensor(0.5), branches=2).metrics.ensemble is True


def test_the_step_refuses_loss_options_beside_an_objective():
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"cot_kind, temperature and backend describe the default objective; "
                                         r"with objective=PerBranchObjective\(...\) pass them to it, got "
                                         r"cot_kind='kl'"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), cot_weight=torch.tensor(0.5), branches=2,
                  cot_kind="kl", objective=per_branch())
