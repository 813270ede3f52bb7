"""Edge values of the native CPU kernels (semantics version 2, shared with the CUDA kernels
through csrc/divco/cotrain_math.h), against a local float64 reference that spells the
agreed semantics out:

- a -inf logit has probability exactly 0 and contributes 0 to every entropy and KL term
  (p log p := 0 at p = 0; the p_t log p_s terms of the KLs into branch s are dropped where
  p_s = 0), with gradient 0; a branch whose logits are all -inf is NaN;
- logits near +-3e38 stay finite; the mean-of-logits ensemble does not overflow when the
  mean fits in float32;
- the max / max_probs ensemble gradient goes to the first branch holding NaN, else the
  first maximal branch (torch.max);
- the max_probs ensemble: per-class max over branches of softmax(z_s), no renormalisation.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from divco import vocabulary

NEG_INF = float("-inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def cotrain(ops, logits, target, weight=0.5, kind="js", temperature=1.0):
    w = torch.tensor(float(weight), dtype=torch.float32)
    return ops.cotrain_loss_native(logits, target, w, None, kind, temperature, True)


def masked_log_softmax(z):
    """log p and its masked-safe version (0 where p = 0 exactly: a masked class)."""
    log_p = F.log_softmax(z, dim=-1)
    masked = torch.isneginf(log_p)
    return log_p, masked, torch.where(masked, torch.zeros_like(log_p), log_p)


def reference_loss(logits, target, weight, kind, temperature):
    """float64 loss = sum_s CE_s + weight J with the masked-class semantics above."""
    z = logits.double()
    ce = -F.log_softmax(z, dim=-1).gather(-1, target[:, None, None].expand(-1, z.shape[1], 1)).squeeze(-1).mean(0)
    log_p, masked, safe = masked_log_softmax(z / temperature)
    p = safe.exp().masked_fill(masked, 0.0)
    S = z.shape[1]
    if S == 1:
        cot = z.sum() * 0
    elif kind == "js":
        pbar = p.mean(1)
        log_pbar = torch.where(pbar == 0, torch.zeros_like(pbar), pbar.clamp_min(1e-300).log())
        entropy_of_mean = -(pbar * log_pbar).sum(-1)
        mean_entropy = -(p * safe).sum(-1).mean(1)
        cot = (entropy_of_mean - mean_entropy).mean()
    else:
        total = 0
        for t in range(S):
            teacher, teacher_safe = p[:, t].detach(), safe[:, t].detach()
            for s in range(S):
                if s != t:
                    cross = torch.where(masked[:, s], torch.zeros_like(teacher), teacher * safe[:, s])
                    total = total + (teacher * teacher_safe - cross).sum(-1)
        cot = (total / (S - 1)).mean()
    return ce.sum() + weight * cot, cot


def check_against_reference(ops, logits, target, kind, temperature=1.0, weight=0.7):
    out = cotrain(ops, logits, target, weight=weight, kind=kind, temperature=temperature)
    z = logits.double().requires_grad_()
    loss, cot = reference_loss(z, target, weight, kind, temperature)
    loss.backward()
    assert torch.isfinite(out[0]) and torch.isfinite(out[5]).all()
    torch.testing.assert_close(out[0].double(), loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2].double(), cot.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[5].double(), z.grad, rtol=1e-4, atol=1e-7)
    return out


def test_build_info_reports_modes_and_semantics(native):
    info = native.build_info()
    assert info["ensemble_modes"] == list(vocabulary.ENSEMBLE_MODES)
    assert info["semantics_version"] == 2


@pytest.mark.parametrize("kind", ["js", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_classes_masked_in_one_branch_only(ops, kind, temperature):
    """Before: kl gave +inf (p_s = 0 under p_t > 0) and a nonzero gradient on masked logits."""
    g = torch.Generator().manual_seed(0)
    N, S, K = 5, 3, 12
    logits = torch.randn(N, S, K, generator=g) * 2
    logits[:, 1, 8:] = NEG_INF  # branch 1 masks classes 8..11, the others do not
    logits[0, 2, 3] = NEG_INF
    target = torch.randint(0, 8, (N,), generator=g)
    out = check_against_reference(ops, logits, target, kind, temperature)
    assert (out[5][:, 1, 8:] == 0).all() and out[5][0, 2, 3] == 0


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_classes_masked_in_every_branch_match_the_smaller_problem(ops, kind):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, 10, generator=g)
    logits[:, :, 7:] = NEG_INF
    target = torch.tensor([0, 1, 2, 3])
    out = check_against_reference(ops, logits, target, kind)
    smaller = cotrain(ops, logits[:, :, :7].contiguous(), target, weight=0.7, kind=kind)
    torch.testing.assert_close(out[0], smaller[0])
    torch.testing.assert_close(out[5][:, :, :7], smaller[5])
    assert (out[5][:, :, 7:] == 0).all()


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_a_branch_of_only_minus_inf_is_nan(ops, kind):
    logits = torch.randn(3, 2, 6)
    logits[1, 0] = NEG_INF
    out = cotrain(ops, logits, torch.tensor([0, 1, 2]), kind=kind)
    assert out[0].isnan() and out[1][0].isnan()
    assert out[5][1].isnan().any()
    assert torch.isfinite(out[5][[0, 2]]).all()  # other rows are untouched


@given(
    rows=st.integers(1, 4),
    branches=st.integers(2, 4),
    classes=st.integers(2, 40),
    kind=st.sampled_from(["js", "kl"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_random_masks_match_the_float64_reference(native, rows, branches, classes, kind, seed):
    ops = torch.ops.divco  # (the session-scoped `native` fixture registered it)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, branches, classes, generator=g) * 3
    mask = torch.rand(rows, branches, classes, generator=g) < 0.3
    mask[..., 0] = False  # the target class 0 stays unmasked: every CE is finite
    logits[mask] = NEG_INF
    check_against_reference(ops, logits, torch.zeros(rows, dtype=torch.long), kind)


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_logits_near_float32_max_stay_finite(ops, kind):
    """Before: the ensemble (and the co-training value for kl) overflowed to inf."""
    big = 3e38
    logits = torch.tensor([[[big, -big, 0.0], [big, 0.0, -big]], [[1.0, big, 2.0], [-big, big, 0.0]]])
    target = torch.tensor([0, 1])
    out = check_against_reference(ops, logits, target, kind)
    torch.testing.assert_close(out[3], logits.double().mean(1).float())  # the mean fits in float32
    assert torch.equal(out[4], torch.tensor([2, 2, 2]))


def test_mean_of_logits_ensembles_do_not_overflow(ops):
    logits = torch.full((2, 4, 3), 3e38)
    logits[1, :, 1] = -3e38
    assert torch.equal(ops.ensemble_native(logits, "mean_logits", None), logits[:, 0])
    geo = ops.ensemble_native(logits, "geo_mean", None)
    assert torch.isfinite(geo).all()
    torch.testing.assert_close(geo, torch.softmax(logits.double().mean(1), -1).float())


def test_mean_of_logits_is_the_correctly_rounded_mean(ops):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 3, 50, generator=g) * 10
    expected = logits.double().mean(1).float()
    assert torch.equal(ops.ensemble_native(logits, "mean_logits", None), expected)
    assert torch.equal(cotrain(ops, logits, torch.zeros(64, dtype=torch.long))[3], expected)


def reference_ensemble(logits, mode):
    """float64; max and max_probs route through torch.max (first NaN, else first maximum)."""
    z = logits.double()
    if mode == "max_probs":
        return torch.softmax(z, -1).max(dim=1).values
    if mode == "max":
        return z.max(dim=1).values
    raise ValueError(mode)


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    rows=st.integers(0, 3),
    branches=st.integers(1, 5),
    classes=st.integers(1, 30),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20, deadline=None)
def test_max_probs_matches_float64_reference(native, dtype, rows, branches, classes, ties, seed):
    ops = torch.ops.divco
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, branches, classes, generator=g) * 2).to(dtype)
    if ties:
        logits[:, -1] = logits[:, 0]  # equal probabilities: the first branch takes the gradient
    grad_out = torch.randn(rows, classes, generator=g).to(dtype)
    out = ops.ensemble_native(logits, "max_probs", None)
    z = logits.double().requires_grad_()
    expected = reference_ensemble(z, "max_probs")
    (expected * grad_out.double()).sum().backward()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected.detach(), rtol=tol, atol=tol)
    got = ops.ensemble_backward_native(grad_out, logits, "max_probs", None)
    assert got.dtype == dtype and got.shape == logits.shape
    torch.testing.assert_close(got.double(), z.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["max", "max_probs"])
def test_max_gradients_go_to_the_first_nan_branch(ops, mode):
    nan = float("nan")
    logits = torch.tensor(
        [[[1.0, 4.0, 0.0, 2.0], [1.0, nan, 3.0, 2.0], [nan, nan, 3.0, 5.0], [2.0, nan, 1.0, 2.0]]]
    )  # [1, S=4, K=4]
    grad_out = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    z = logits.double().requires_grad_()
    expected = reference_ensemble(z, mode)
    (expected * grad_out.double()).sum().backward()
    torch.testing.assert_close(ops.ensemble_native(logits, mode, None).double(), expected.detach(), equal_nan=True)
    got = ops.ensemble_backward_native(grad_out, logits, mode, None)
    picked = (torch.softmax(logits.double(), -1) if mode == "max_probs" else logits.double()).max(dim=1).indices
    if mode == "max":
        assert picked[0].tolist() == [2, 1, 1, 2]  # class 1: NaN in branches 1, 2 and 3 -> branch 1
    else:  # every class of a branch with a NaN logit is NaN: the first such branch takes all
        assert picked[0].tolist() == [1, 1, 1, 1]
        assert (got[0, 0] == 0).all() and got[0, 1].isnan().all()  # (branches 2, 3: NaN * 0, as autograd)
    torch.testing.assert_close(got.double(), z.grad, equal_nan=True)


def test_max_probs_mode_error_lists_every_mode(ops):
    with pytest.raises(ValueError, match='"max_probs", "vote"; got "median"'):
        ops.ensemble_native(torch.randn(2, 2, 3), "median", None)


def test_build_config_default_arch_list_embeds_ptx():
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).resolve().parents[2] / "csrc" / "build_config.json").read_text())
    archs = config["default_cuda_arch_list"].split(";")
    assert archs[-1].endswith("+PTX") and not any(a.endswith("+PTX") for a in archs[:-1])
    assert math.isfinite(float(archs[-1].removesuffix("+PTX")))
