"""Per-sample weights of the co-training loss: every mean over the batch
becomes mean_n v_n · loss_n, on every backend. The random comparison with the float64
reference (values and gradients, hard and soft targets, "js" and "kl", zeros among the
weights) is part of test_backends.test_cotrain_loss_matches_reference; here: exact cases,
the unweighted path, differentiability, torch.compile and the input checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from backend_params import backend_params, device_for

import divco.ops as ops
from divco.ops import schema

FUSED = ("triton", "cpu", "cuda")


def problem(N=5, S=3, K=7, seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, S, K, generator=g) * 2
    target = torch.randint(0, K, (N,), generator=g)
    if soft:
        target = torch.softmax(torch.randn(N, K, generator=g) * 2, -1)
    return logits, target


def run(backend, logits, target, sample_weight=None, dtype=torch.float32, **kwargs):
    """(result, dloss/dlogits) of one call on ``backend``'s device."""
    device = device_for(backend)
    z = logits.to(device, dtype).clone().requires_grad_()  # a leaf, also for a view of logits
    v = None if sample_weight is None else sample_weight.to(device)
    out = ops.cotrain_loss(z, target.to(device), sample_weight=v, backend=backend, **kwargs)
    out.loss.backward()
    return out, z.grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unit_weights_give_the_unweighted_bits(backend, dtype):
    """v = 1 multiplies every row term and gradient by exactly 1: the weighted path changes no
    bit of the unweighted results (so sample_weight=None and ones are interchangeable)."""
    if backend == "torch" and dtype != torch.float32:
        pytest.skip("the reference computes reduced precisions in float32 too")
    for kind in ("js", "kl"):
        for soft in (False, True):
            logits, target = problem(seed=3, soft=soft)
            plain, plain_grad = run(backend, logits, target, None, dtype, kind=kind, temperature=2.0)
            ones, ones_grad = run(backend, logits, target, torch.ones(5), dtype, kind=kind, temperature=2.0)
            for a, b in zip(plain, ones):
                assert torch.equal(a, b), (kind, soft)
            assert torch.equal(plain_grad, ones_grad)


@pytest.mark.parametrize("backend", backend_params())
def test_hand_computed_two_rows(backend):
    """S = 1, K = 2, zero logits: every row's cross-entropy is log 2 and its gradient
    (softmax - one_hot) / N = ±1/4. With v = [2, 0]: CE = (2 log 2 + 0) / 2 = log 2, row 0's
    gradient doubles and row 1's vanishes."""
    logits = torch.zeros(2, 1, 2)
    target = torch.tensor([0, 1])
    out, grad = run(backend, logits, target, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out.loss.detach().cpu(), torch.tensor(math.log(2)))
    torch.testing.assert_close(out.ce.cpu(), torch.tensor([math.log(2)]))
    assert float(out.cot) == 0.0
    expected = torch.tensor([[[-0.5, 0.5]], [[0.0, 0.0]]])
    torch.testing.assert_close(grad.cpu(), expected)
    assert out.correct.tolist() == [1, 1]  # argmax of a tie is class 0: row 0 right, row 1 wrong


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["js", "kl"])
def test_weight_two_and_zero_is_the_first_row_alone(backend, kind):
    """N = 2, v = [2, 0]: (1/2)(2 L_0 + 0 L_1) = L_0, the loss of row 0 alone (ce and cot
    too); row 0's gradient is row 0's alone and row 1's is 0. correct still counts both rows."""
    logits, target = problem(N=2, seed=5)
    both, grad = run(backend, logits, target, torch.tensor([2.0, 0.0]), kind=kind, temperature=1.5)
    alone, alone_grad = run(backend, logits[:1], target[:1], kind=kind, temperature=1.5)
    unweighted, _ = run(backend, logits, target, kind=kind, temperature=1.5)
    torch.testing.assert_close(both.loss, alone.loss)
    torch.testing.assert_close(both.ce, alone.ce)
    torch.testing.assert_close(both.cot, alone.cot)
    torch.testing.assert_close(grad[:1], alone_grad)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert both.correct.tolist() == unweighted.correct.tolist()
    assert torch.equal(both.ensemble, unweighted.ensemble)


@pytest.mark.parametrize("backend", backend_params())
def test_weighted_mean_of_the_rows_losses(backend):
    """Not normalised: loss = (1/N) Σ_n v_n L_n with L_n the loss of row n alone."""
    logits, target = problem(N=4, seed=7, soft=True)
    v = torch.tensor([1.0, 3.0, 0.5, 0.0])
    out, grad = run(backend, logits, target, v, kind="js", weight=0.7)
    rows = [run(backend, logits[n : n + 1], target[n : n + 1], kind="js", weight=0.7) for n in range(4)]
    expected = sum(float(v[n]) * float(rows[n][0].loss.detach()) for n in range(4)) / 4
    torch.testing.assert_close(float(out.loss), expected, rtol=1e-5, atol=1e-6)
    expected_grad = torch.cat([float(v[n]) / 4 * rows[n][1] for n in range(4)])
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_the_reference_differentiates_the_weights():
    """dloss/dv_n = (Σ_s CE_ns + weight · J_n) / N, the row's own (unweighted) loss over N."""
    logits, target = problem(N=3, seed=11)
    v = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64, requires_grad=True)
    out = ops.cotrain_loss(logits.double(), target, sample_weight=v, weight=0.3, kind="kl", backend="torch")
    out.loss.backward()
    rows = [ops.cotrain_loss(logits[n : n + 1].double(), target[n : n + 1], weight=0.3, kind="kl",
                             backend="torch").loss for n in range(3)]
    torch.testing.assert_close(v.grad, torch.stack(rows) / 3)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_fused_backends_refuse_weights_that_require_grad(backend):
    logits, target = problem()
    device = device_for(backend)
    v = torch.ones(5, device=device, requires_grad=True)
    with pytest.raises(ValueError, match=r"does not differentiate sample_weight.*backend='torch'"):
        ops.cotrain_loss(logits.to(device), target.to(device), sample_weight=v, backend=backend)
    with torch.no_grad():  # nothing would be differentiated: allowed
        ops.cotrain_loss(logits.to(device), target.to(device), sample_weight=v, backend=backend)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_the_operators_never_return_a_silent_zero_gradient_for_the_weights(backend):
    device = device_for(backend)
    logits, target = problem()
    op = schema.operator("cotrain_loss", backend)
    v = torch.ones(5, device=device, requires_grad=True)
    out = op(logits.to(device), target.to(device), torch.tensor(0.5, device=device), v, "js", 1.0, False)
    with pytest.raises(RuntimeError, match=r"does not differentiate sample_weight.*backend='torch'"):
        out[0].backward()


@pytest.mark.parametrize(
    "sample_weight, message",
    [
        (torch.ones(4), r"sample_weight must have shape \[N\] = \[5\].*got \(4,\)"),
        (torch.ones(5, 1), r"sample_weight must have shape \[N\] = \[5\].*got \(5, 1\)"),
        (torch.ones(5, dtype=torch.int64), r"sample_weight must be a floating-point tensor, got dtype torch.int64"),
        ([1.0] * 5, r"sample_weight must be None or a floating tensor of shape \[N\] = \[5\], got list"),
        (torch.tensor([1.0, -0.5, 1.0, 1.0, 1.0]), r"finite and >= 0, got sample_weight\[1\] = -0.5"),
        (torch.tensor([1.0, 1.0, 1.0, math.nan, 1.0]), r"finite and >= 0, got sample_weight\[3\] = nan"),
        (torch.tensor([1.0, 1.0, 1.0, 1.0, math.inf], dtype=torch.float64), r"sample_weight\[4\] = inf"),
        (torch.ones(5, device="meta"), r"sample_weight is on meta but logits are on cpu"),
    ],
)
def test_bad_sample_weights(sample_weight, message):
    logits, target = problem()
    with pytest.raises(ValueError, match=message):
        ops.cotrain_loss(logits, target, sample_weight=sample_weight)


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_the_operators_check_the_weights_they_read(backend):
    """Called directly (torch.ops.divco.*), the operators take float32 [N] only."""
    device = device_for(backend)
    logits, target = problem()
    op = schema.operator("cotrain_loss", backend)
    weight = torch.tensor(0.5, device=device)
    for bad in (torch.ones(5, dtype=torch.float64, device=device), torch.ones(4, device=device)):
        with pytest.raises(ValueError, match=r"sample_weight must be a float32 tensor of shape \[N\] = \[5\]"):
            op(logits.to(device), target.to(device), weight, bad, "js", 1.0, False)


@pytest.mark.parametrize(
    "backend, compiler",
    [pytest.param(*p.values, "aot_eager", marks=p.marks, id=f"{p.id}-aot_eager")
     for p in backend_params("torch", "triton", "cpu")]
    + [pytest.param(*p.values, "inductor", marks=p.marks, id=f"{p.id}-inductor") for p in backend_params("cpu")],
)
def test_compiles_without_graph_breaks_with_sample_weight(backend, compiler):
    """fullgraph=True with per-sample weights; new weight values do not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)

    @torch.compile(fullgraph=True, backend=counter)
    def step(logits, target, sample_weight):
        out = ops.cotrain_loss(logits, target, sample_weight=sample_weight, kind="kl", backend=backend)
        return out.loss, out.cot

    logits, target = problem(N=6, seed=13)
    device = device_for(backend)
    for seed in (0, 1):
        v = torch.rand(6, generator=torch.Generator().manual_seed(seed)) * 2
        z = logits.clone().to(device).requires_grad_()
        loss, cot = step(z, target.to(device), v.to(device))
        loss.backward()
        z_ref = logits.double().requires_grad_()
        ref = ops.cotrain_loss(z_ref, target, sample_weight=v.double(), kind="kl", backend="torch")
        ref.loss.backward()
        torch.testing.assert_close(loss.detach().cpu().double(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cot.cpu().double(), ref.cot, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z.grad.cpu().double(), z_ref.grad, rtol=1e-5, atol=1e-7)
    assert counter.frame_count == 1


def test_soft_targets_and_weights_on_the_reference_are_plain_products():
    """The reference is literal: CE_s = mean_n v_n (-Σ_k y_nk log softmax(z_ns)_k)."""
    logits, target = problem(N=4, S=2, soft=True, seed=17)
    v = torch.tensor([0.0, 1.0, 2.5, 0.25], dtype=torch.float64)
    out = ops.cotrain_loss(logits.double(), target.double(), sample_weight=v, backend="torch")
    per_row = -(target.double()[:, None, :] * F.log_softmax(logits.double(), -1)).sum(-1)  # [N, S]
    torch.testing.assert_close(out.ce, (v[:, None] * per_row).mean(0))


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_weighted_cpu_results_are_bit_identical_for_any_thread_count(backend):
    """The weights scale per-row partials before the fixed-order sum: still thread-count free."""
    logits, target = problem(N=300, S=4, K=10, seed=19)
    v = torch.rand(300, generator=torch.Generator().manual_seed(2)) * 2
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, grad = run(backend, logits, target, v, kind="kl", temperature=1.3)
            results.append((*out, grad))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)
