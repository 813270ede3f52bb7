"""The benchmark's CUDA paths: whole-step CUDA graphs, CUDA-event timing, the matmul peak.

GPU only (skipped elsewhere); the GPU suite runs these before `divco bench --device cuda`.
"""

import pytest
import torch

import divco
from divco.benchmark.environment import matmul_peak_flops
from divco.benchmark.measure import time_cuda
from divco.benchmark.methods import MethodUnavailable, Workload, build_method
from divco.benchmark.steps import MethodInferStep, MethodTrainStep, Variant

pytestmark = pytest.mark.gpu
MODEL = "wide_resnet16_4"


def _methods(S=2):
    workload = Workload(MODEL, S, 10, 16, torch.device("cuda"), channels_last=True)
    torch.manual_seed(0)
    divided = divco.models.create(MODEL, num_classes=10, branches=S)
    for name in ("divco-batched", "divco-per-branch", "loop", "vmap", "packed", "undivided"):
        try:
            yield name, build_method(name, workload, divided)
        except MethodUnavailable:
            continue


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_bf16_training_steps_update_the_weights(graphs):
    for name, method in _methods():
        images, target = method.train_inputs(8, torch.Generator().manual_seed(0))
        before = [p.detach().clone() for p in method.parameters()]
        step = MethodTrainStep(method, images, target, Variant(torch.bfloat16, cuda_graphs=graphs))
        times = time_cuda(step, repeats=3, warmup=1)
        assert len(times) == 3 and all(t > 0 for t in times), name
        after = list(method.parameters())
        assert all(torch.isfinite(p).all() for p in after), name
        changed = any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
        assert changed, f"{name}: the step changed nothing"


def test_graph_replay_takes_the_same_step_as_eager():
    """Two copies of a method from the same weights: eager steps and graph replays agree."""
    results = {}
    for graphs in (False, True):
        method = dict(_methods())["divco-batched"]
        images, target = method.train_inputs(8, torch.Generator().manual_seed(0))
        step = MethodTrainStep(method, images, target, Variant(cuda_graphs=graphs))  # float32: comparable
        extra = 0 if graphs else 3  # the capture ran 3 warm-up steps eagerly
        for _ in range(extra + 2):
            step()
        torch.cuda.synchronize()
        results[graphs] = torch.cat([p.detach().flatten() for p in method.parameters()])
    torch.testing.assert_close(results[True], results[False], rtol=1e-3, atol=1e-4)


def test_graphed_inference_matches_eager():
    for name, method in _methods():
        images = method.infer_inputs(4, torch.Generator().manual_seed(0))
        method.train(False)
        with torch.inference_mode():
            expected = method.forward_infer(images).float()
        outputs = {}

        def keep(x, original=method.forward_infer, outputs=outputs):
            outputs["last"] = original(x)  # the graph's static output, refreshed by every replay
            return outputs["last"]

        method.forward_infer = keep
        step = MethodInferStep(method, images, Variant(cuda_graphs=True))
        step()
        torch.cuda.synchronize()
        torch.testing.assert_close(outputs["last"].float(), expected, rtol=1e-4, atol=1e-4, msg=name)


def test_compiled_step_runs():
    method = dict(_methods())["divco-batched"]
    images, target = method.train_inputs(8, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    step = MethodTrainStep(method, images, target, Variant(torch.bfloat16, compile=True))
    assert all(t > 0 for t in time_cuda(step, repeats=2, warmup=1))


def test_matmul_peak_is_plausible():
    peak = matmul_peak_flops(torch.device("cuda"), size=4096, repeats=5)
    assert 1e12 < peak["flops_per_s"] < 1e16
