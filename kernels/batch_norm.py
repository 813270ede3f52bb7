"""Triton kernels of the fused branch-wise BatchNorm: act(batch_norm(x) + residual).

x is read through a [N, C, HW] view with element strides (stride_n, stride_c, stride_hw),
which covers NCHW (C*HW, HW, 1) and channels_last (HW*C, 1, C) alike; outputs
have x's strides. A program owns a tile [BLOCK_C channels, BLOCK_HW positions]; Triton's
coalescing pass orders it along whichever stride is 1 (integer arguments equal to 1 are
specialised).

Forward (training), three launches:
  1. partial sums per (channel tile, chunk of the batch): Σ(x - p), Σ(x - p)² with the pivot
     p = x[0, c, 0], so a channel with a large mean loses no precision to cancellation;
  2. per channel: sum the chunks in a fixed order -> mean, biased variance (float32);
  3. one elementwise pass: y = x·scale + shift (+ residual), ReLU.
Eval runs only pass 3 on the running statistics.

Backward, dy' = dy · [out > 0] (ReLU; recomputed from the saved output), three launches:
  1. partial sums Σ dy', Σ dy'·(x - mean);  2. per channel: grad_bias, grad_weight;
  3. one elementwise pass: dx = k·dy' + b·(x - mean) + c, and dy' as the residual's gradient.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(base_ptr, n, offs_c, offs_hw, stride_n, stride_c, stride_hw):
    return (base_ptr + tl.cast(n, tl.int64) * stride_n + offs_c.to(tl.int64)[:, None] * stride_c
            + offs_hw.to(tl.int64)[None, :] * stride_hw)


@triton.jit
def bn_partial_sums_kernel(
    x_ptr, grad_ptr, out_ptr, mean_ptr, partial_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, batches_per_chunk,
    BACKWARD: tl.constexpr, RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """partial[chunk, 0|1, c]: forward Σ(x-p), Σ(x-p)²; backward Σdy', Σdy'·(x-mean)."""
    pid_c = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    if BACKWARD:
        centre = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
    else:
        centre = tl.load(x_ptr + offs_c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(tl.float32)
    acc1 = tl.zeros((BLOCK_C, BLOCK_HW), tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_HW), tl.float32)
    n_begin = chunk * batches_per_chunk
    n_end = tl.minimum(n_begin + batches_per_chunk, N)
    for n in range(n_begin, n_end):
        for hw0 in range(0, HW, BLOCK_HW):
            offs_hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (offs_hw < HW)[None, :]
            offsets = _tile(0, n, offs_c, offs_hw, stride_n, stride_c, stride_hw)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - centre[:, None], 0.0)
            if BACKWARD:
                g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                if RELU:
                    o = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                    g = tl.where(o > 0.0, g, 0.0)
                acc1 += g
                acc2 += g * d
            else:
                acc1 += d
                acc2 += d * d
    base = partial_ptr + chunk.to(tl.int64) * 2 * C
    tl.store(base + offs_c, tl.sum(acc1, axis=1), mask=c_mask)
    tl.store(base + C + offs_c, tl.sum(acc2, axis=1), mask=c_mask)


@triton.jit
def bn_finalize_kernel(
    x_ptr, partial_ptr, var_ptr, first_ptr, second_ptr,
    C, chunks, stride_c, count, eps,
    BACKWARD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chunks summed in order. Forward: first = mean, second = biased variance.
    Backward (var_ptr = the saved variance): first = Σdy' (grad_bias), second = Σdy'·x̂ (grad_weight)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    s1 = tl.zeros((BLOCK_C,), tl.float32)
    s2 = tl.zeros((BLOCK_C,), tl.float32)
    for chunk in range(0, chunks):
        base = partial_ptr + chunk * 2 * C
        s1 += tl.load(base + offs_c, mask=c_mask, other=0.0)
        s2 += tl.load(base + C + offs_c, mask=c_mask, other=0.0)
    if BACKWARD:
        var = tl.load(var_ptr + offs_c, mask=c_mask, other=1.0)
        tl.store(first_ptr + offs_c, s1, mask=c_mask)
        tl.store(second_ptr + offs_c, s2 * (1.0 / tl.sqrt(var + eps)), mask=c_mask)
    else:
        pivot = tl.load(x_ptr + offs_c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(tl.float32)
        shift = s1 / count
        tl.store(first_ptr + offs_c, pivot + shift, mask=c_mask)
        tl.store(second_ptr + offs_c, tl.maximum(s2 / count - shift * shift, 0.0), mask=c_mask)


@triton.jit
def bn_forward_kernel(
    x_ptr, residual_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    C, HW, stride_n, stride_c, stride_hw, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """out = act(x·scale + shift (+ residual)), scale = w/sqrt(var+eps), shift = b - mean·scale."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1)
    offs_hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + offs_c, mask=c_mask, other=1.0) + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0)
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0)
    mask = c_mask[:, None] & (offs_hw < HW)[None, :]
    offsets = _tile(0, n, offs_c, offs_hw, stride_n, stride_c, stride_hw)
    y = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * scale[:, None] + shift[:, None]
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, like torch.relu
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_backward_kernel(
    grad_ptr, x_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    grad_x_ptr, grad_residual_ptr,
    C, HW, stride_n, stride_c, stride_hw, count, eps,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr, WRITE_RESIDUAL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dx = w·invstd·(dy' - Σdy'/M - x̂·Σdy'x̂/M) in training, w·invstd·dy' in eval."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1)
    offs_hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = offs_c < C
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_c, mask=c_mask, other=1.0) + eps)
    k = invstd
    if HAS_WEIGHT:
        k = k * tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0)
    mask = c_mask[:, None] & (offs_hw < HW)[None, :]
    offsets = _tile(0, n, offs_c, offs_hw, stride_n, stride_c, stride_hw)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(o > 0.0, g, 0.0)
    if TRAINING:
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
        b = -k * invstd * tl.load(sum_dy_xhat_ptr + offs_c, mask=c_mask, other=0.0) / count
        c = -k * tl.load(sum_dy_ptr + offs_c, mask=c_mask, other=0.0) / count
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dx = k[:, None] * g + b[:, None] * (x - mean[:, None]) + c[:, None]
    else:
        dx = k[:, None] * g
    tl.store(grad_x_ptr + offsets, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if WRITE_RESIDUAL:
        tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)
