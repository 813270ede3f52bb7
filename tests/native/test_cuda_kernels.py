"""The native CUDA kernels (csrc/divco/ops/cuda/) against the native CPU kernels, which the
CPU-only tests check against the float64 reference: same formulas (cotrain_math.h), so the
two agree to float32 rounding. Also: determinism, strides, NaN / out-of-range rows, S up to
the kernel's limit, and capture in a CUDA graph (no host synchronisation)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def run(ops, logits, target, weight=0.5, kind="js", temperature=1.0, compute_grad=True):
    w = torch.tensor(float(weight), dtype=torch.float32, device=logits.device)
    return ops.cotrain_loss_native(logits, target, w, None, kind, temperature, compute_grad)


def assert_matches_cpu(out, expected, dtype):
    tol = TOLERANCE[dtype]
    for name, got, want in zip(("loss", "ce", "cot", "ensemble", "correct", "grad"), out, expected):
        got = got.cpu()
        if name == "correct":
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["js", "kl"])
@pytest.mark.parametrize("S, K", [(1, 10), (2, 100), (4, 1000), (3, 5000), (8, 37), (16, 200), (2, 40_000)])
def test_cotrain_cuda_matches_cpu(ops, dtype, kind, S, K):
    N = 33
    logits = (torch.randn(N, S, K) * 3).to(dtype)
    target = torch.randint(0, K, (N,))
    for temperature in (1.0, 2.0):
        expected = run(ops, logits, target, kind=kind, temperature=temperature)
        out = run(ops, logits.cuda(), target.cuda(), kind=kind, temperature=temperature)
        assert_matches_cpu(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_targets_and_strides(ops, dtype):
    N, S, K = 17, 3, 300
    logits = (torch.randn(N, S, K) * 3).to(dtype)
    target = torch.softmax(torch.randn(N, K), -1)
    expected = run(ops, logits, target, kind="kl", temperature=1.5)
    strided = logits.cuda().permute(2, 0, 1).contiguous().permute(1, 2, 0)
    out = run(ops, strided, target.cuda().t().contiguous().t().double(), kind="kl", temperature=1.5)
    assert_matches_cpu(out, expected, dtype)


def test_deterministic(ops):
    logits = torch.randn(512, 4, 1000, device="cuda")
    target = torch.randint(0, 1000, (512,), device="cuda")
    first, second = run(ops, logits, target), run(ops, logits, target)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_nan_and_out_of_range_rows(ops):
    N, S, K = 8, 2, 50
    logits = torch.randn(N, S, K)
    logits[1, 0, 3] = float("nan")
    target = torch.randint(0, K, (N,))
    target[4], target[6] = -1, K
    expected = run(ops, logits, target)
    out = run(ops, logits.cuda(), target.cuda())
    assert_matches_cpu(out, expected, torch.float32)
    assert out[5][[1, 4, 6]].isnan().all().item()


def test_too_many_branches_is_a_clear_error(ops):
    with pytest.raises(ValueError, match="at most 16 branches"):
        run(ops, torch.randn(2, 17, 5, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda"))


def test_mixed_devices_are_a_clear_error(ops):
    with pytest.raises(ValueError, match="logits' device"):
        run(ops, torch.randn(2, 2, 5, device="cuda"), torch.zeros(2, dtype=torch.long))


def test_captured_in_a_cuda_graph(ops):
    """No host synchronisation: the op records into a CUDA graph, and the weight is read on
    the device at replay (a warm-up schedule changes it without re-capture)."""
    logits = torch.randn(64, 4, 100, device="cuda")
    target = torch.randint(0, 100, (64,), device="cuda")
    weight = torch.tensor(0.5, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.cotrain_loss_native(logits, target, weight, None, "js", 1.0, True)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.cotrain_loss_native(logits, target, weight, None, "js", 1.0, True)
    for value in (0.5, 2.0):
        weight.fill_(value)
        graph.replay()
        eager = ops.cotrain_loss_native(logits, target, weight, None, "js", 1.0, True)
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs", "geo_mean", "max", "max_probs"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S, K", [(1, 7), (3, 100), (5, 5000), (24, 300)])
def test_ensemble_cuda_matches_cpu(ops, mode, dtype, S, K):
    logits = (torch.randn(9, S, K) * 3).to(dtype)
    grad_out = torch.randn(9, K).to(dtype)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(
        ops.ensemble_native(logits.cuda(), mode, None).cpu().float(),
        ops.ensemble_native(logits, mode, None).float(),
        rtol=tol,
        atol=tol,
    )
    torch.testing.assert_close(
        ops.ensemble_backward_native(grad_out.cuda(), logits.cuda(), mode, None).cpu().float(),
        ops.ensemble_backward_native(grad_out, logits, mode, None).float(),
        rtol=tol,
        atol=tol,
    )


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_edge_values_match_cpu(ops, kind):
    """Semantics version 2 (tests/native/test_edge_semantics.py checks the CPU kernels against
    the float64 reference): masked -inf classes, logits near +-3e38, an all -inf branch."""
    N, S, K = 6, 3, 300
    logits = torch.randn(N, S, K) * 2
    logits[:, 1, 200:] = float("-inf")  # masked in one branch
    logits[:, :, 250:] = float("-inf")  # masked in every branch
    logits[1, :, 0] = 3e38
    logits[2, 0, 5], logits[2, 1, 5] = 3e38, -3e38
    logits[3, 2] = float("-inf")  # an all -inf branch: NaN row
    target = torch.randint(0, 200, (N,))
    for temperature in (1.0, 2.0):
        expected = run(ops, logits, target, kind=kind, temperature=temperature)
        out = run(ops, logits.cuda(), target.cuda(), kind=kind, temperature=temperature)
        assert_matches_cpu(out, expected, torch.float32)


@pytest.mark.parametrize("mode", ["max", "max_probs"])
def test_max_ensembles_route_nan_like_cpu(ops, mode):
    logits = torch.randn(4, 5, 33)
    logits[0, 2, 3] = logits[0, 4, 3] = float("nan")
    logits[1, 1:, 7] = logits[1, 0, 7]  # ties: the first branch
    grad_out = torch.randn(4, 33)
    torch.testing.assert_close(
        ops.ensemble_native(logits.cuda(), mode, None).cpu(), ops.ensemble_native(logits, mode, None), equal_nan=True
    )
    got = ops.ensemble_backward_native(grad_out.cuda(), logits.cuda(), mode, None).cpu()
    want = ops.ensemble_backward_native(grad_out, logits, mode, None)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("mode", ["mean_probs", "max_probs"])
def test_ensemble_branch_limit_accounts_for_static_shared_memory(native, ops, mode):
    """S = 6113..6144 used to fail at launch (the static scratch was not counted)."""
    limit = native.build_info()["cuda_max_ensemble_branches"]
    logits = torch.randn(2, limit, 3, device="cuda")
    out = ops.ensemble_native(logits, mode, None)
    grad = ops.ensemble_backward_native(torch.ones(2, 3, device="cuda"), logits, mode, None)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu(), ops.ensemble_native(logits.cpu(), mode, None), rtol=1e-5, atol=1e-6)
    assert grad.shape == logits.shape
    with pytest.raises(ValueError, match=f"at most {limit} branches"):
        ops.ensemble_native(torch.randn(2, limit + 1, 3, device="cuda"), mode, None)


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_float16_logits_get_a_float32_gradient_on_cuda(ops, kind):
    """As the CPU kernel (tests/native/test_cpu_kernels.py): float16 logits, float32 gradient,
    where entries of size p / N below float16's smallest subnormal survive."""
    N, S, K = 64, 2, 8
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(N, S, K, generator=g)
    logits[:, :, 0] += 14.0
    half = logits.half().cuda()
    target = torch.zeros(N, dtype=torch.long, device="cuda")
    grad = run(ops, half, target, kind=kind)[5]
    assert grad.dtype == torch.float32
    expected = run(ops, half.float(), target, kind=kind)[5]
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-12)
    tiny = (expected != 0) & (expected.abs() < 6e-8)
    assert tiny.any() and (grad[tiny] != 0).all()
