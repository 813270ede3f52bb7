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
    from divco.kernels.cotrain import cotrain_loss_kernel
    from divco.kernels.ensemble import MODE_IDS, ensemble_backward_kernel, ensemble_kernel

    def compile_for(kernel, types, constexprs, arch):
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        constants = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})

    ints = dict.fromkeys(["stride_n", "stride_s", "stride_k", "target_stride_n", "target_stride_k",
                          "N", "S", "K"], "i32")
    # Together these variants take every constexpr branch of the kernels at least once.
    for dtype, soft, kl, unit, grad, single, arch in [
        ("bf16", False, False, True, True, True, 90),
        ("fp32", True, True, False, True, False, 90),
        ("fp16", False, False, False, False, False, 90),
        ("bf16", True, False, True, True, False, 80),
    ]:
        types = dict(ints, logits_ptr="*" + dtype, target_ptr="*fp32" if soft else "*i64", weight_ptr="*fp32",
                     ensemble_ptr="*" + dtype, grad_ptr="*" + dtype, ce_rows_ptr="*fp32", cot_rows_ptr="*fp32",
                     hits_ptr="*i32", inv_t="fp32", cot_coef="fp32")
        compile_for(cotrain_loss_kernel, types, dict(SOFT_TARGET=soft, KIND_KL=kl, UNIT_TEMPERATURE=unit,
                    COMPUTE_GRAD=grad, SINGLE_TILE=single, BLOCK_S=4, BLOCK_K=1024), arch)
    for kernel, mode, types in [
        (ensemble_kernel, "mean_probs", dict(ints, logits_ptr="*bf16", out_ptr="*bf16")),
        (ensemble_kernel, "max", dict(ints, logits_ptr="*fp32", out_ptr="*fp32")),
        (ensemble_backward_kernel, "geo_mean", dict(ints, grad_out_ptr="*bf16", logits_ptr="*bf16", grad_ptr="*bf16")),
        (ensemble_backward_kernel, "max", dict(ints, grad_out_ptr="*fp32", logits_ptr="*fp32", grad_ptr="*fp32")),
    ]:
        constexprs = dict(MODE=MODE_IDS[mode], NORMALISED=mode in ("mean_probs", "geo_mean"), BLOCK_S=8, BLOCK_K=512)
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

