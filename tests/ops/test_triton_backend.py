"""The Triton backend's launch policy, and its kernels compiled for real GPUs.

The CPU test-suite runs the kernels through Triton's interpreter, which accepts code that
the GPU compiler may reject (types, layouts, constexpr branches). Triton can compile for a
GPU target without a GPU, so this compiles every kernel variant family for sm_80 and sm_90
(in a subprocess: this process has TRITON_INTERPRET=1 set).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from divco.ops import triton_backend

pytestmark = pytest.mark.skipif(bool(triton_backend.TRITON_ERROR), reason="Triton is not importable")


@pytest.mark.parametrize("S, K", [(1, 2), (4, 10), (4, 100), (2, 1000), (8, 5000), (2, 32000), (3, 40000)])
def test_tile_shape_covers_all_branches_and_bounds_the_tile(S, K):
    block_s, block_k, num_warps = triton_backend.tile_shape(S, K)
    assert block_s >= S and block_s & (block_s - 1) == 0
    assert block_k & (block_k - 1) == 0 and block_k >= min(K, 16)
    assert block_s * block_k <= max(triton_backend.MAX_TILE_ELEMENTS, 16 * block_s)
    assert num_warps in (1, 2, 4, 8) and block_s * block_k <= 16 * 32 * num_warps
    if S * K <= 1024:
        assert block_k >= K  # small problems are read once (single tile)


COMPILE_SCRIPT = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from divco.kernels.cotrain_loss import cotrain_loss_kernel
    from divco.kernels.ensemble import MODE_IDS, NORMALISED_MODES, ensemble_backward_kernel, ensemble_kernel

    def compile_for(kernel, types, constexprs, arch):
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        constants = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})

    ints = dict.fromkeys(["stride_n", "stride_s", "stride_k", "target_stride_n", "target_stride_k",
                          "sample_weight_stride", "N", "S", "K"], "i32")
    # Together these variants take every constexpr branch of the kernels at least once.
    for dtype, soft, kl, unit, grad, single, weighted, arch in [
        ("bf16", False, False, True, True, True, False, 90),
        ("fp32", True, True, False, True, False, True, 90),
        ("fp16", False, False, False, False, False, True, 90),
        ("bf16", True, False, True, True, False, False, 80),
    ]:
        types = dict(ints, logits_ptr="*" + dtype, target_ptr="*fp32" if soft else "*i64", weight_ptr="*fp32",
                     sample_weight_ptr="*fp32", ensemble_ptr="*" + dtype,
                     grad_ptr="*fp32" if dtype == "fp16" else "*" + dtype, ce_rows_ptr="*fp32", cot_rows_ptr="*fp32",
                     hits_ptr="*i32", inv_t="fp32", cot_coef="fp32")
        compile_for(cotrain_loss_kernel, types, dict(SOFT_TARGET=soft, KIND_KL=kl, UNIT_TEMPERATURE=unit,
                    COMPUTE_GRAD=grad, HAS_SAMPLE_WEIGHT=weighted, SINGLE_TILE=single, BLOCK_S=4, BLOCK_K=1024), arch)
    ints["weights_ptr"] = "*fp32"
    for kernel, mode, weighted, types in [
        (ensemble_kernel, "mean_probs", False, dict(ints, logits_ptr="*bf16", out_ptr="*bf16")),
        (ensemble_kernel, "max", False, dict(ints, logits_ptr="*fp32", out_ptr="*fp32")),
        (ensemble_backward_kernel, "geo_mean", False, dict(ints, grad_out_ptr="*bf16", logits_ptr="*bf16", grad_ptr="*bf16")),
        (ensemble_backward_kernel, "max", False, dict(ints, grad_out_ptr="*fp32", logits_ptr="*fp32", grad_ptr="*fp32")),
        (ensemble_kernel, "max_probs", False, dict(ints, logits_ptr="*fp16", out_ptr="*fp16")),
        (ensemble_backward_kernel, "max_probs", False, dict(ints, grad_out_ptr="*fp16", logits_ptr="*fp16", grad_ptr="*fp16")),
        (ensemble_backward_kernel, "mean_probs", False, dict(ints, grad_out_ptr="*fp32", logits_ptr="*fp32", grad_ptr="*fp32")),
        (ensemble_kernel, "vote", False, dict(ints, logits_ptr="*bf16", out_ptr="*bf16")),
        (ensemble_backward_kernel, "vote", False, dict(ints, grad_out_ptr="*fp32", logits_ptr="*fp32", grad_ptr="*fp32")),
    ] + [  # the weighted path of every weighted mode, forward and backward
        (kernel, mode, True, dict(ints, grad_out_ptr="*fp32", logits_ptr="*fp32", out_ptr="*fp32", grad_ptr="*fp32"))
        for kernel in (ensemble_kernel, ensemble_backward_kernel)
        for mode in ("mean_logits", "mean_probs", "geo_mean", "vote")
    ]:
        constexprs = dict(MODE=MODE_IDS[mode], NORMALISED=mode in NORMALISED_MODES, HAS_WEIGHTS=weighted,
                          BLOCK_S=8, BLOCK_K=512)
        types = {name: t for name, t in types.items() if name in kernel.arg_names}
        compile_for(kernel, types, constexprs, 90)
    print("compiled")
    """
)


def test_kernels_compile_for_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]



def test_nothing_probes_the_kernels_at_call_time(monkeypatch):
    """Whether the kernels are interpreted is decided at import: an isinstance
    on a Triton kernel inside a traced call breaks torch.compile before torch 2.12."""
    import torch
    import triton.runtime.interpreter

    import divco.ops as ops

    class Probe(type):
        def __instancecheck__(cls, obj):
            raise AssertionError("a Triton kernel object was inspected at call time")

    monkeypatch.setattr(triton.runtime.interpreter, "InterpretedFunction", Probe("InterpretedFunction", (), {}))
    # (torch's own wrap_triton looks at the kernel when launching, so no kernel runs here)
    from divco.ops import backends

    for device in (torch.device("cpu"), torch.device("cuda")):
        backends.triton_status(device)
        ops.available_backends(device)
    assert backends.resolve_backend("triton", torch.device("cpu"), torch.float32) == "triton"
    with triton_backend.quiet_interpreter():
        pass


def test_device_guard_makes_the_logits_device_current(monkeypatch):
    """Triton launches on the current device: tensors on cuda:1 need cuda:1 current."""
    import contextlib

    import torch

    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with triton_backend.device_guard(torch.device("cuda", 1)):
        pass
    with triton_backend.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_launcher_enters_the_device_guard(monkeypatch):
    import contextlib

    import torch

    guarded = []

    def recording_guard(device):
        guarded.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(triton_backend, "device_guard", recording_guard)
    device = torch.device("cpu" if triton_backend.KERNELS_INTERPRETED else "cuda")
    logits = torch.randn(2, 3, 4, device=device)
    torch.ops.divco.cotrain_loss_triton(logits, torch.tensor([0, 1], device=device), torch.tensor(0.5, device=device),
                                        None, "js", 1.0, False)
    torch.ops.divco.ensemble_triton(logits, "max", None)
    torch.ops.divco.ensemble_backward_triton(torch.randn(2, 4, device=device), logits, "max", None)
    assert guarded == [logits.device] * 3


def test_the_gradient_has_its_own_buffer_without_compute_grad(monkeypatch):
    """The ensemble buffer is never passed as the gradient pointer too: that
    was correct only while Inductor pruned the masked store."""
    import torch

    launched = []
    wrap = triton_backend.wrap_triton

    def recording_wrap(kernel):
        launcher = wrap(kernel)

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launched.append(args)
                    return launcher[grid](*args, **kwargs)

                return launch

        return Recorder()

    monkeypatch.setattr(triton_backend, "wrap_triton", recording_wrap)
    device = torch.device("cpu" if triton_backend.KERNELS_INTERPRETED else "cuda")
    logits = torch.randn(2, 3, 4, device=device)
    for compute_grad in (False, True):
        out = torch.ops.divco.cotrain_loss_triton(
            logits, torch.tensor([0, 1], device=device), torch.tensor(0.5, device=device), None, "js", 1.0, compute_grad
        )
        args = launched[-1]
        ensemble_arg, grad_arg = args[10], args[11]
        assert grad_arg is not ensemble_arg and grad_arg.data_ptr() != ensemble_arg.data_ptr()
        assert grad_arg.shape == ((2, 3, 4) if compute_grad else (0,)) and out[5].shape == grad_arg.shape


def test_a_missing_kernels_package_is_a_packaging_error():
    """Running from a checkout without installing: not "Triton unavailable" but a clear error."""
    code = (
        "import sys\n"
        "sys.modules['divco.kernels'] = None  # what a checkout without pip install -e . looks like\n"
        "try:\n"
        "    import divco.ops\n"
        "except ImportError as error:\n"
        "    print('ERROR', error)\n"
        "else:\n"
        "    print('IMPORTED', divco.ops.triton_backend.TRITON_ERROR)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ERROR divco.kernels" in result.stdout and "pip install -e ." in result.stdout, result.stdout + result.stderr
