"""torch.library registration of the fused operators: opcheck (schema, fake kernel, autograd,
AOT dispatch) for every backend present, and the Triton schemas against the contract. (The
native operators' C++ schemas are checked against the contract in tests/native/test_build.py.)"""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from backend_params import backend_mode_params, backend_params, device_for

import divco.ops
from divco.ops import backends, registration, schema, triton_backend
from divco.vocabulary import OPERATOR_SUFFIX


def cotrain_cases(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 9, generator=g).to(device)
    labels = torch.randint(0, 9, (3,), generator=g).to(device)
    soft = torch.softmax(torch.randn(3, 9, generator=g), -1).to(device)
    weight = torch.tensor(0.5, device=device)
    strided = torch.randn(3, 9, 3, generator=g).to(device).transpose(1, 2)
    sample_weight = torch.tensor([2.0, 0.0, 0.75], device=device)
    strided_sample_weight = torch.rand(6, generator=g).to(device)[::2]
    return [
        (logits.clone().requires_grad_(), labels, weight, None, "js", 1.0, True),
        (logits.clone().requires_grad_(), soft, weight, None, "kl", 2.0, True),
        (strided.to(torch.bfloat16).requires_grad_(), labels, weight, None, "js", 0.5, True),
        (logits, labels, weight, None, "js", 1.0, False),
        (logits.clone().requires_grad_(), labels, weight, sample_weight, "js", 1.0, True),
        (logits.clone().requires_grad_(), soft, weight, strided_sample_weight, "kl", 2.0, True),
        (logits, labels, weight, sample_weight, "kl", 1.0, False),
    ]


@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda"))
def test_opcheck_cotrain_loss(backend):
    op = schema.operator("cotrain_loss", backend)
    for args in cotrain_cases(device_for(backend)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend, mode", backend_mode_params("triton", "cpu", "cuda"))
def test_opcheck_ensemble(backend, mode):
    device = device_for(backend)
    forward = schema.operator("ensemble", backend)
    backward = schema.operator("ensemble_backward", backend)
    logits = torch.randn(2, 3, 6, device=device)
    torch.library.opcheck(forward, (logits.clone().requires_grad_(), mode, None))
    torch.library.opcheck(backward, (torch.randn(2, 6, device=device), logits, mode, None))


@pytest.mark.parametrize("base", ["cotrain_loss", "ensemble", "ensemble_backward"])
def test_triton_schemas_are_the_contract_on_every_torch(base):
    """torch 2.11 infers a triton_op's schema from the launcher's annotations (schema= is
    ignored), newer versions may take what they are given: the annotations alone must give the
    contract's arguments and return types, and that is what is registered."""
    if triton_backend.TRITON_ERROR:
        pytest.skip("Triton is not importable")
    op = getattr(torch.ops.divco, schema.op_name(base, "triton")).default
    # divco.ops.cotrain_loss is the function; the module is divco.ops.cotrain_loss in sys.modules
    module = importlib.import_module("divco.ops." + base.removesuffix("_backward"))
    launcher = getattr(module, schema.op_name(base, "triton"))
    inferred = torch.library.infer_schema(launcher._init_fn, mutates_args=())
    contract = schema.signature(schema.full_schema(base, "triton"))
    assert schema.signature(inferred) == contract
    assert schema.signature(str(op._schema)) == contract


def test_operator_names_are_regular():
    """divco::<op>_<suffix> for every op and backend, the backward included."""
    for backend, suffix in OPERATOR_SUFFIX.items():
        for base in ("cotrain_loss", "ensemble", "ensemble_backward"):
            assert schema.qualified_name(base, suffix) == f"divco::{base}_{suffix}"
            if backends.backend_status(backend, torch.device(backend if backend != "triton" else "cpu"))[0]:
                assert schema.operator(base, backend) is getattr(torch.ops.divco, f"{base}_{suffix}")
    with pytest.raises(ValueError, match="unknown operator 'loss'"):
        schema.op_name("loss", "native")


def test_native_ops_registered_only_with_the_extension():
    ok, reason = backends.native_status()
    if ok:
        assert "native" in registration.defined_suffixes()
        assert "divco::cotrain_loss_native" in registration._registered
        assert torch._C._dispatch_has_kernel_for_dispatch_key("divco::cotrain_loss_native", "CPU")
    else:
        assert "native" not in registration.defined_suffixes()
        assert "divco._C" in reason


@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda"))
def test_backward_scales_the_stored_gradient(backend):
    device = device_for(backend)
    logits = torch.randn(4, 2, 6, device=device, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3], device=device)
    op = schema.operator("cotrain_loss", backend)
    loss, ce, cot, ensemble, correct, grad = op(logits, target, torch.tensor(0.5, device=device), None, "js", 1.0, True)
    (3.0 * loss).backward()
    torch.testing.assert_close(logits.grad, 3.0 * grad)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        out = op(logits, target, torch.tensor(0.5, device=device), None, "js", 1.0, False)
        out[0].backward()


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda"))
def test_backward_materialises_no_zero_gradients(backend):
    """Only the loss is differentiable: the backward of the fused loss allocates no zero
    gradients for ce, cot, ensemble, correct and grad (one scale of the stored gradient)."""
    device = device_for(backend)
    logits = torch.randn(4, 3, 6, device=device, requires_grad=True)
    weight = torch.tensor(0.5, device=device, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3], device=device)
    out = divco.ops.cotrain_loss(logits, target, weight=weight, backend=backend)
    assert not out.ce.requires_grad and not out.ensemble.requires_grad
    with _RecordOps() as recorded:
        out.loss.backward()
    filled = [n for n in recorded.names if n in ("zeros", "zeros_like", "new_zeros", "fill", "fill_", "full", "zero_")]
    assert filled == [], recorded.names
    torch.testing.assert_close(weight.grad, out.cot)
    assert logits.grad is not None


def _keep_native_state(monkeypatch):
    """The backends' decision about divco._C, restored after the test."""
    for name in ("_NATIVE_LOADED", "_NATIVE_REASON", "_NATIVE_HAS_CUDA"):
        monkeypatch.setattr(backends, name, getattr(backends, name))


def _assert_native_unavailable(reason_pattern):
    ok, reason = backends.native_status()
    assert not ok and "python setup.py build_ext --inplace" in reason
    with pytest.raises(ValueError, match=reason_pattern):
        backends.resolve_backend("cpu", torch.device("cpu"), torch.float32)
    assert backends.resolve_backend(None, torch.device("cpu"), torch.float32) == "torch"
    assert "native" not in registration.defined_suffixes()


@pytest.mark.skipif(not backends.native_status()[0], reason="divco._C is not built")
def test_a_stale_native_build_warns_and_disables_the_native_backend(monkeypatch):
    """An extension built from older sources lacks an operator an op module registers: a warning
    naming it and the rebuild, and the cpu/cuda backends unavailable (never an import error,
    never a silent change of kernel)."""
    _keep_native_state(monkeypatch)
    monkeypatch.setitem(schema._SCHEMAS, "stale_op", "(Tensor x) -> Tensor")
    with pytest.warns(RuntimeWarning, match=r"divco._C is out of date: it registers no divco::stale_op_native.*"
                                            r"'cpu' and 'cuda' backends are unavailable"):
        registration.register("stale_op", "native", fake=lambda x: x)
    assert "divco::stale_op_native" not in registration._registered
    _assert_native_unavailable("stale_op_native")


@pytest.mark.skipif(not backends.native_status()[0], reason="divco._C is not built")
def test_a_native_operator_with_another_schema_disables_the_native_backend(monkeypatch):
    _keep_native_state(monkeypatch)
    monkeypatch.setitem(schema._SCHEMAS, "ensemble", "(Tensor logits, str mode) -> Tensor")
    monkeypatch.setattr(registration, "_registered", set())
    with pytest.warns(RuntimeWarning, match=r"it registers divco::ensemble_native\(Tensor logits, str mode, Tensor\? weights\)"):
        registration.register("ensemble", "native")
    _assert_native_unavailable("divco expects ensemble_native")


@pytest.mark.skipif(not backends.native_status()[0], reason="divco._C is not built")
def test_the_probe_finds_a_missing_native_operator(monkeypatch):
    """The import-time probe checks every operator of NATIVE_OPERATORS (batch_norm's too)."""
    monkeypatch.setattr(backends, "NATIVE_OPERATORS", (*backends.NATIVE_OPERATORS, "retired_op"))
    with pytest.warns(RuntimeWarning, match=r"registers no divco::retired_op_native"):
        loaded, reason, has_cuda = backends._probe_native()
    assert not loaded and not has_cuda and "python setup.py build_ext --inplace" in reason
    monkeypatch.undo()  # the real list: every operator is there
    assert backends._probe_native()[0]