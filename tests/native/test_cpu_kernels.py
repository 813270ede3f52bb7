"""What is specific to the native CPU kernels (csrc/divco/ops/cpu/): any strides, large K,
bit-identical results for any thread count, NaN / out-of-range rows that stay local, and
the C++ input checks. The comparison of every backend with the float64 reference over
random shapes lives in tests/ops/."""

import pytest
import torch

from divco.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def cotrain(ops, logits, target, weight=0.5, kind="js", temperature=1.0, compute_grad=True):
    w = torch.tensor(float(weight), dtype=torch.float32)
    return ops.cotrain_loss_native(logits, target, w, None, kind, temperature, compute_grad)


def assert_outputs_equal(a, b):
    """Bit-identical outputs (NaN where NaN)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def layouts(logits):
    """Views of the same [N, S, K] values with other strides (no copy semantics change)."""
    N, S, K = logits.shape
    yield "contiguous", logits
    yield "class-major", logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # stride_k = N*S
    yield "branch-major", logits.transpose(0, 1).contiguous().transpose(0, 1)
    padded = torch.zeros(N, S, 2 * K, dtype=logits.dtype)
    padded[:, :, ::2] = logits
    yield "strided classes", padded[:, :, ::2]
    yield "offset view", torch.cat([torch.zeros(1, S, K, dtype=logits.dtype), logits])[1:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True])
def test_any_strides_give_bit_identical_results(ops, dtype, soft):
    N, S, K = 6, 3, 37
    logits = (torch.randn(N, S, K) * 4).to(dtype)
    target = torch.softmax(torch.randn(N, K), -1) if soft else torch.randint(0, K, (N,))
    expected = cotrain(ops, logits, target, kind="kl", temperature=2.0)
    for name, view in layouts(logits):
        assert torch.equal(view, logits), name
        assert_outputs_equal(cotrain(ops, view, target, kind="kl", temperature=2.0), expected)
    # strided soft targets and targets given in other float dtypes (converted once to float32)
    if soft:
        assert_outputs_equal(cotrain(ops, logits, target.t().contiguous().t(), kind="kl", temperature=2.0), expected)
        assert_outputs_equal(cotrain(ops, logits, target.double(), kind="kl", temperature=2.0), expected)


def test_expanded_branches_share_memory(ops):
    """A [N, 1, K] tensor expanded to S branches (stride 0) is read correctly."""
    one = torch.randn(5, 1, 11)
    expanded = one.expand(5, 4, 11)
    assert_outputs_equal(cotrain(ops, expanded, torch.arange(5)), cotrain(ops, expanded.contiguous(), torch.arange(5)))


@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs", "geo_mean", "max", "max_probs"])
def test_ensemble_strides_give_bit_identical_results(ops, mode):
    logits = torch.randn(4, 3, 29)
    grad_out = torch.randn(4, 29)
    expected = ops.ensemble_native(logits, mode, None)
    expected_grad = ops.ensemble_backward_native(grad_out, logits, mode, None)
    for name, view in layouts(logits):
        assert torch.equal(ops.ensemble_native(view, mode, None), expected), name
        assert torch.equal(ops.ensemble_backward_native(grad_out.t().contiguous().t(), view, mode, None), expected_grad), name


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_large_k_matches_float64_reference(ops, kind):
    N, S, K = 3, 3, 40_000
    logits = torch.randn(N, S, K) * 3
    target = torch.randint(0, K, (N,))
    out = cotrain(ops, logits, target, weight=0.7, kind=kind, temperature=1.5)
    z = logits.double().requires_grad_()
    ref = reference.cotrain_loss(z, target, 0.7, kind, 1.5)
    ref.loss.backward()
    torch.testing.assert_close(out[0].double(), ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1].double(), ref.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2].double(), ref.cot, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[5].double(), z.grad, rtol=1e-4, atol=1e-9)
    assert torch.equal(out[4], ref.correct)


@pytest.mark.parametrize("shape", [(300, 4, 10), (64, 2, 3000)])
def test_bit_identical_for_any_thread_count(ops, shape):
    """Training resume equivalence relies on it: per-row partials, then a fixed-order sum."""
    logits = torch.randn(*shape) * 3
    target = torch.randint(0, shape[2], (shape[0],))
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(
                (
                    cotrain(ops, logits, target, kind="js", temperature=1.3),
                    cotrain(ops, logits.bfloat16(), target, kind="kl"),
                    ops.ensemble_native(logits, "mean_probs", None),
                    ops.ensemble_backward_native(logits[:, 0], logits, "geo_mean", None),
                )
            )
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0][:2], other[:2]):
            assert_outputs_equal(a, b)
        assert torch.equal(results[0][2], other[2]) and torch.equal(results[0][3], other[3])


def test_nan_logits_stay_in_their_row(ops):
    N, S, K = 8, 3, 16
    logits = torch.randn(N, S, K)
    target = torch.randint(0, K, (N,))
    clean = cotrain(ops, logits, target)
    poisoned = logits.clone()
    poisoned[2, 1, 5] = float("nan")
    out = cotrain(ops, poisoned, target)
    assert out[0].isnan() and out[2].isnan()
    assert out[1].isnan().tolist() == [False, True, False]  # only branch 1's cross-entropy
    assert out[5][2].isnan().all()  # the whole row: every branch meets the NaN through pbar
    keep = torch.arange(N) != 2
    assert torch.equal(out[5][keep], clean[5][keep])
    assert torch.equal(out[3][keep], clean[3][keep])
    assert out[3][2].isnan().any()


def test_out_of_range_targets_give_nan_rows_and_never_read_out_of_bounds(ops):
    N, S, K = 6, 2, 9
    logits = torch.randn(N, S, K)
    target = torch.randint(0, K, (N,))
    clean = cotrain(ops, logits, target)
    bad = target.clone()
    bad[1], bad[3], bad[4] = -1, K, 2**40
    out = cotrain(ops, logits, bad)
    assert out[0].isnan() and out[1].isnan().all()
    assert not out[2].isnan()  # the co-training term does not use the targets
    invalid = torch.zeros(N, dtype=torch.bool)
    invalid[[1, 3, 4]] = True
    assert out[5][invalid].isnan().all()
    assert torch.equal(out[5][~invalid], clean[5][~invalid])
    hits = (logits.argmax(-1) == bad[:, None]).sum(0)  # an invalid target is never a hit
    assert torch.equal(out[4][:S], hits)


def test_masked_logits_are_handled_like_log_softmax(ops):
    """-inf logits (masked classes) have probability 0: finite loss, zero gradient there."""
    logits = torch.randn(4, 2, 10)
    logits[:, :, 7:] = float("-inf")
    out = cotrain(ops, logits, torch.tensor([0, 1, 2, 3]), kind="js")
    assert torch.isfinite(out[0]) and torch.isfinite(out[5]).all()
    assert (out[5][:, :, 7:] == 0).all()
    finite = cotrain(ops, logits[:, :, :7].contiguous(), torch.tensor([0, 1, 2, 3]), kind="js")
    torch.testing.assert_close(out[0], finite[0])
    torch.testing.assert_close(out[5][:, :, :7], finite[5])


def test_without_gradient_the_other_outputs_are_unchanged(ops):
    logits = torch.randn(5, 2, 12)
    target = torch.randint(0, 12, (5,))
    with_grad = cotrain(ops, logits, target)
    without = cotrain(ops, logits, target, compute_grad=False)
    assert without[5].shape == (0,)
    assert_outputs_equal(with_grad[:5], without[:5])


def test_weight_is_read_from_the_tensor(ops):
    logits = torch.randn(7, 3, 5)
    target = torch.randint(0, 5, (7,))
    for weight in (0.0, 0.5, 3.0):
        loss, ce, cot, *_ = cotrain(ops, logits, target, weight=weight)
        torch.testing.assert_close(loss, ce.sum() + weight * cot)
    # weight 0: only the cross-entropy's gradient is left, whatever the co-training kind
    assert torch.equal(
        cotrain(ops, logits, target, weight=0.0, kind="js")[5], cotrain(ops, logits, target, weight=0.0, kind="kl")[5]
    )
    assert not torch.equal(
        cotrain(ops, logits, target, weight=1.0, kind="js")[5], cotrain(ops, logits, target, weight=0.0, kind="js")[5]
    )


def test_max_ensemble_follows_torch_max(ops):
    """Ties go to the first branch, a NaN wins, like torch.max(dim=1)."""
    logits = torch.tensor([[[1.0, 2.0, 0.0], [1.0, 5.0, float("nan")], [0.5, 5.0, 3.0]]])
    values, indices = logits.max(dim=1)
    out = ops.ensemble_native(logits, "max", None)
    assert torch.equal(out.nan_to_num(), values.nan_to_num()) and out[0, 2].isnan()
    grad_out = torch.tensor([[1.0, 2.0, 3.0]])
    expected = torch.zeros_like(logits).scatter_(1, indices[:, None], grad_out[:, None])
    assert torch.equal(ops.ensemble_backward_native(grad_out, logits, "max", None), expected)


def test_empty_batch(ops):
    out = cotrain(ops, torch.randn(0, 2, 5), torch.zeros(0, dtype=torch.long))
    assert out[0].isnan() and out[3].shape == (0, 5) and out[5].shape == (0, 2, 5)
    assert torch.equal(out[4], torch.zeros(3, dtype=torch.long))
    assert ops.ensemble_native(torch.randn(0, 2, 5), "mean_probs", None).shape == (0, 5)


BAD_COTRAIN_INPUTS = [
    # (logits, target, weight, kind, temperature, message)
    (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), None, "js", 1.0, "3 dims"),
    (torch.randn(4, 2, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long), None, "js", 1.0, "float32, bfloat16"),
    (torch.zeros(4, 2, 5, dtype=torch.long), torch.zeros(4, dtype=torch.long), None, "js", 1.0, "got Long"),
    (torch.randn(4, 0, 5), torch.zeros(4, dtype=torch.long), None, "js", 1.0, "S >= 1"),
    (torch.randn(4, 2, 0), torch.zeros(4, dtype=torch.long), None, "js", 1.0, "K >= 1"),
    (torch.randn(4, 2, 5), torch.zeros(3, dtype=torch.long), None, "js", 1.0, r"\[N\] = \[4\]"),
    (torch.randn(4, 2, 5), torch.zeros(4, 6), None, "js", 1.0, r"\[N, K\] = \[4, 5\]"),
    (torch.randn(4, 2, 5), torch.zeros(4, dtype=torch.int32), None, "js", 1.0, "int64 class indices"),
    (torch.randn(4, 2, 5), torch.zeros(4, dtype=torch.long), torch.tensor([0.5]), "js", 1.0, "0-dim float32"),
    (
        torch.randn(4, 2, 5),
        torch.zeros(4, dtype=torch.long),
        torch.tensor(0.5, dtype=torch.float64),
        "js",
        1.0,
        "0-dim",
    ),
    (torch.randn(4, 2, 5), torch.zeros(4, dtype=torch.long), None, "jsd", 1.0, 'kind must be "js" or "kl"'),
    (torch.randn(4, 2, 5), torch.zeros(4, dtype=torch.long), None, "js", 0.0, "temperature must be"),
    (torch.randn(4, 2, 5), torch.zeros(4, dtype=torch.long), None, "js", float("nan"), "temperature must be"),
]


@pytest.mark.parametrize("logits, target, weight, kind, temperature, message", BAD_COTRAIN_INPUTS)
def test_cotrain_input_errors_name_expected_and_received(ops, logits, target, weight, kind, temperature, message):
    weight = torch.tensor(0.5) if weight is None else weight
    with pytest.raises(ValueError, match=message):
        ops.cotrain_loss_native(logits, target, weight, None, kind, temperature, True)


def test_ensemble_input_errors(ops):
    logits = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match='mode must be one of "mean_logits"'):
        ops.ensemble_native(logits, "median", None)
    with pytest.raises(ValueError, match=r"grad_out must have shape \[N, K\] = \[3, 4\]"):
        ops.ensemble_backward_native(torch.randn(3, 5), logits, "mean_probs", None)
    with pytest.raises(ValueError, match="3 dims"):
        ops.ensemble_native(torch.randn(3, 4), "max", None)


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_float16_logits_get_a_float32_gradient(ops, kind):
    """The stored gradient of float16 logits is float32 (as the Triton operator's): entries of
    size p / N (here ~1e-9) underflow float16 to 0 before a GradScaler multiplies them. It
    equals the gradient of the same values given as float32 logits (the kernel computes in
    float32 after loading)."""
    N, S, K = 64, 2, 8
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(N, S, K, generator=g)
    logits[:, :, 0] += 14.0  # the other classes get p ~ 1e-7, so p / N ~ 1e-9
    half = logits.half()
    target = torch.zeros(N, dtype=torch.long)
    grad = cotrain(ops, half, target, kind=kind)[5]
    assert grad.dtype == torch.float32
    expected = cotrain(ops, half.float(), target, kind=kind)[5]
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    tiny = (expected != 0) & (expected.abs() < 6e-8)  # below float16's smallest subnormal
    assert tiny.any() and (grad[tiny] != 0).all()


def test_float16_backward_scales_in_float32(ops):
    """Through the public op: a GradScaler-sized grad_loss (65536) times the float32 stored
    gradient, cast to float16 last, keeps the tiny entries that float16 storage lost."""
    import divco.ops as divco_ops

    N, S, K = 64, 2, 8
    g = torch.Generator().manual_seed(3)
    base = torch.randn(N, S, K, generator=g)
    base[:, :, 0] += 14.0
    target = torch.zeros(N, dtype=torch.long)
    half = base.half().requires_grad_()
    (divco_ops.cotrain_loss(half, target, backend="cpu").loss * 65536.0).backward()
    single = base.half().float().requires_grad_()
    (divco_ops.cotrain_loss(single, target, backend="cpu").loss * 65536.0).backward()
    assert half.grad.dtype == torch.float16
    torch.testing.assert_close(half.grad, single.grad.half(), rtol=0, atol=0)
    assert (half.grad[:, :, 1:] != 0).all()
