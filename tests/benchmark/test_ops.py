"""divco.benchmark.ops (the fused-op micro-benchmarks) at tiny sizes: records and steps."""

import torch

import divco.ops as ops
from divco.benchmark import ops as bench_ops
from divco.ops.triton_backend import kernels_interpreted


def test_run_returns_one_record_per_case_and_implementation():
    cases = [bench_ops.OpCase(8, 2, 5), bench_ops.OpCase(4, 3, 7, kind="kl")]
    records = bench_ops.run("cpu", cases, repeats=2, warmup=1, compiled=False)
    impls = bench_ops.implementations("cpu", compiled=False)
    assert [(r["N"], r["impl"]) for r in records] == [(c.N, i) for c in cases for i in impls]
    for r in records:
        assert r["op"] == "cotrain_loss" and r["device"] == "cpu" and r["repeats"] == 2
        assert len(r["times_s"]) == 2 and r["median_ms"] > 0
        if r["impl"] == "eager":
            assert r["speedup_vs_eager"] == 1.0
    assert "N8 S2 K5 float32 js" in bench_ops.format_table(records)


def test_implementations_never_time_the_interpreter():
    impls = bench_ops.implementations("cpu")
    assert impls[:2] == ["eager", "compiled"]
    if kernels_interpreted():
        assert "triton" not in impls


def test_weighted_cases_pass_the_same_weights_to_every_implementation():
    case = bench_ops.OpCase(5, 2, 6, weighted=True)
    grads = []
    for impl in bench_ops.implementations("cpu", compiled=False):
        logits, target = bench_ops.make_inputs(case, "cpu")
        bench_ops.make_step(impl, case, "cpu", inputs=(logits, target))()
        grads.append(logits.grad.clone())
    unweighted, target = bench_ops.make_inputs(case, "cpu")
    bench_ops.make_step("eager", bench_ops.OpCase(5, 2, 6), "cpu", inputs=(unweighted, target))()
    assert not torch.allclose(grads[0], unweighted.grad)  # the weights reach the loss
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0])
    assert case.label.endswith("-weighted")


def test_every_step_computes_the_same_gradient():
    case = bench_ops.OpCase(4, 2, 6, kind="kl")
    grads = []
    for impl in bench_ops.implementations("cpu", compiled=False):
        logits, target = bench_ops.make_inputs(case, "cpu")
        step = bench_ops.make_step(impl, case, "cpu", inputs=(logits, target))
        step()
        step()  # repeated steps overwrite, not accumulate, the gradient
        grads.append(logits.grad.clone())
    logits, target = bench_ops.make_inputs(case, "cpu")
    ops.cotrain_loss(logits, target, weight=0.5, kind="kl", backend="torch").loss.backward()
    for grad in grads:
        torch.testing.assert_close(grad, logits.grad)


def test_host_cost_cases_are_tiny_and_in_the_default_run():
    """The per-call host cost is measured at tiny sizes, next to eager in the same run."""
    import inspect

    assert all(c.N * c.S * c.K <= 200 for c in bench_ops.HOST_CASES)
    default = inspect.signature(bench_ops.run).parameters["cases"].default
    assert set(bench_ops.HOST_CASES) <= set(default) and set(bench_ops.CASES) <= set(default)
    records = bench_ops.run("cpu", bench_ops.HOST_CASES[:1], repeats=2, warmup=1, compiled=False)
    assert {r["impl"] for r in records} == set(bench_ops.implementations("cpu", compiled=False))
    assert all(r["speedup_vs_eager"] > 0 for r in records)
