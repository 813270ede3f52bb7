"""torch.library registration of the fused operators: opcheck (schema, fake kernel, autograd,
AOT dispatch) for every backend present, and the Triton schemas against the contract. (The
native operators' C++ schemas are checked against the contract in tests/native/test_build.py.)"""

import importlib

import pytest
import torch
from backend_params import backend_mode_params, backend_params, device_for

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


def test_a_stale_native_build_is_a_clear_error(monkeypatch):
    """An extension built from older sources lacks an operator an op module registers: say so."""
    monkeypatch.setitem(schema._SCHEMAS, "stale_op", "(Tensor x) -> Tensor")
    with pytest.raises(ImportError, match=r"divco._C is out of date: it registers no divco::stale_op_native"):
        registration.register("stale_op", "native", fake=lambda x: x)
