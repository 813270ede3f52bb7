"""Bad input gets a ValueError that names what was expected and what came."""

import math

import pytest
import torch

import divco.ops as ops


def good():
    return torch.randn(4, 3, 5), torch.tensor([0, 1, 2, 4])


@pytest.mark.parametrize(
    "logits, target, message",
    [
        (torch.randn(4, 5), torch.tensor([0, 1, 2, 4]), r"\[N, S, K\].*2-D tensor of shape \(4, 5\)"),
        (torch.randn(2, 4, 3, 5), torch.tensor([0, 1]), r"\[N, S, K\].*4-D"),
        (torch.randint(0, 3, (4, 3, 5)), torch.tensor([0, 1, 2, 4]), r"floating point.*got dtype torch.int64"),
        (torch.randn(0, 3, 5), torch.zeros(0, dtype=torch.long), r"at least one sample"),
        (torch.randn(4, 3, 5), torch.tensor([0.0, 1.0, 2.0, 4.0]), r"integer tensor \(int64\).*\[N, K\] = \[4, 5\]"),
        (torch.randn(4, 3, 5), torch.tensor([0, 1, 2]), r"shape \[N\] = \[4\].*got \(3,\)"),
        (torch.randn(4, 3, 5), torch.rand(4, 6), r"\[N, K\] = \[4, 5\].*got \(4, 6\)"),
        (torch.randn(4, 3, 5), torch.ones(4, dtype=torch.bool), r"int64 class indices.*torch.bool"),
        (torch.randn(4, 3, 5), [0, 1, 2, 4], r"target must be a torch.Tensor.*list"),
        ("logits", torch.tensor([0, 1, 2, 4]), r"logits must be a torch.Tensor.*str"),
    ],
)
def test_bad_shapes_and_dtypes(logits, target, message):
    with pytest.raises(ValueError, match=message):
        ops.cotrain_loss(logits, target)


def test_class_index_out_of_range_names_the_value():
    logits, _ = good()
    with pytest.raises(ValueError, match=r"target\[2\] = 5 is not a class index in \[0, 4\]"):
        ops.cotrain_loss(logits, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match=r"target\[0\] = -1"):
        ops.cotrain_loss(logits, torch.tensor([-1, 1, 2, 2]))


def test_other_integer_class_dtypes_are_accepted():
    logits, target = good()
    a = ops.cotrain_loss(logits, target, backend="torch")
    b = ops.cotrain_loss(logits, target.to(torch.int32), backend="torch")
    assert a.loss.item() == b.loss.item()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="jsd"), r"kind must be one of \('js', 'kl'\), got 'jsd'"),
        (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1), r"temperature must be a finite number > 0, got -1.0"),
        (dict(temperature=math.inf), r"finite number > 0, got inf"),
        (dict(temperature="1"), r"temperature must be a positive number, got str"),
        (dict(weight=torch.ones(2)), r"weight must be a number or a 0-dim tensor, got shape \(2,\)"),
        (dict(weight=torch.tensor(1)), r"weight must be a floating-point tensor, got dtype torch.int64"),
        (dict(weight="0.5"), r"weight must be a number or a 0-dim tensor, got str"),
        (dict(weight=math.inf), r"weight must be a finite number, got inf"),
        (dict(weight=math.nan), r"weight must be a finite number, got nan"),
        (dict(weight=torch.tensor(-math.inf)), r"weight must be finite, got -inf"),
        (dict(weight=torch.tensor(math.nan, dtype=torch.float64)), r"weight must be finite, got nan"),
        (dict(backend="numpy"), r"backend must be one of \('torch', 'triton', 'cpu', 'cuda'\).*'numpy'"),
        (dict(backend="cuda"), r"backend='cuda' is not available for tensors on cpu"),
    ],
)
def test_bad_arguments(kwargs, message):
    logits, target = good()
    with pytest.raises(ValueError, match=message):
        ops.cotrain_loss(logits, target, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_negative_weights_are_allowed(backend):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not available here")
    logits, target = good()
    plus = ops.cotrain_loss(logits, target, weight=0.5, backend=backend)
    minus = ops.cotrain_loss(logits, target, weight=torch.tensor(-0.5), backend=backend)
    torch.testing.assert_close(minus.loss, plus.ce.sum() - 0.5 * plus.cot)


def test_bad_ensemble_mode_and_logits():
    logits, _ = good()
    with pytest.raises(ValueError, match=r"mode must be one of \('mean_logits', 'mean_probs', 'geo_mean', 'max', 'max_probs', 'vote'\)"):
        ops.ensemble(logits, "median")
    with pytest.raises(ValueError, match=r"\[N, S, K\]"):
        ops.ensemble(logits[0], "max")


def test_float64_needs_the_torch_backend():
    logits, target = good()
    out = ops.cotrain_loss(logits.double(), target)  # default picks the torch backend
    assert out.loss.dtype == torch.float64
    if "triton" in ops.available_backends("cpu"):
        with pytest.raises(ValueError, match=r"takes float32, bfloat16 or float16 logits, got torch.float64"):
            ops.cotrain_loss(logits.double(), target, backend="triton")


def test_unavailable_backend_from_the_environment(monkeypatch):
    logits, target = good()
    monkeypatch.setenv("DIVCO_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"DIVCO_BACKEND='cuda' is not available for tensors on cpu"):
        ops.cotrain_loss(logits, target)
    monkeypatch.setenv("DIVCO_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"DIVCO_BACKEND must be one of"):
        ops.ensemble(logits)


def test_device_mismatch_is_caught_before_any_kernel():
    """The checks run on any machine: the meta device stands in for a GPU here."""
    logits, target = good()
    with pytest.raises(ValueError, match=r"target is on cpu but logits are on meta; expected the same device"):
        ops.cotrain_loss(logits.to("meta"), target)
    with pytest.raises(ValueError, match=r"weight is on cpu but logits are on meta"):
        ops.cotrain_loss(logits.to("meta"), target.to("meta"), weight=torch.tensor(0.5))


@pytest.mark.gpu
def test_device_mismatch():
    logits, target = good()
    with pytest.raises(ValueError, match=r"target is on cpu but logits are on cuda:0"):
        ops.cotrain_loss(logits.cuda(), target)
    with pytest.raises(ValueError, match=r"weight is on cpu but logits are on cuda:0"):
        ops.cotrain_loss(logits.cuda(), target.cuda(), weight=torch.tensor(0.5))


@pytest.mark.gpu
def test_cuda_range_check_only_on_request(monkeypatch):
    logits, _ = good()
    target = torch.tensor([0, 1, 7, 2], device="cuda")
    out = ops.cotrain_loss(logits.cuda(), target)
    assert torch.isnan(out.loss).item()  # no host sync: the bad row shows up as NaN
    monkeypatch.setenv("DIVCO_CHECK_TARGETS", "1")
    with pytest.raises(ValueError, match=r"target\[2\] = 7"):
        ops.cotrain_loss(logits.cuda(), target)
