"""Triton kernels of the fused branch-wise BatchNorm: act(batch_norm(x) + residual).

x is read through a [N, C, HW] view with element strides (stride_n, stride_c, stride_hw) that
the launcher derives from the memory format (NCHW: (C*HW, HW, 1), channels_last: (HW*C, 1, C)),
never from x.stride(), whose entries for size-1 dims are arbitrary; outputs are allocated in
that layout. A tile is [BLOCK_C channels, BLOCK_HW positions of one sample]; Triton's
coalescing pass orders it along whichever stride is 1 (integer arguments equal to 1 are
specialised). A "unit" is one (sample, H·W tile) pair: units = N · cdiv(HW, BLOCK_HW).

Forward (training), three launches (two for an input of at most SINGLE_CHUNK_UNITS units per
channel tile: pass 1 then covers the whole channel and writes pass 2's outputs itself, FINALIZE):
  1. per (channel tile, chunk of consecutive units) -- the N·H·W positions are split, as the
     CUDA kernel splits them, so a few large images still give many programs: count, mean and
     biased variance of the chunk, of x - p with the pivot p = x[0, c, 0] (a channel with a
     large mean loses no precision). Each tile's mean and variance are two-pass values
     (Σ x/n, then Σ ((x - m)·√(1/n))²: no term exceeds the variance), merged into the chunk's
     with Chan's parallel formula in variance form, so no sum of squares can overflow: every
     float32 input whose variance fits float32 works (a sum of squares gives inf, then 0 out,
     at |x| ~ 1e18);
  2. per channel: merge the chunks in a fixed order (deterministic) -> mean, biased variance
     (the running statistics are updated by divco.ops.batch_norm: the operator is functional);
  3. one elementwise pass: y = x·scale + shift (+ residual), ReLU.
Eval runs only pass 3 on the running statistics.

Backward, dy' = dy · [out > 0] (ReLU; recomputed from the saved output), three launches (two, as
the forward, for small inputs):
  1. partial sums per (channel tile, chunk of units): Σ dy', Σ dy'·(x - mean);
  2. per channel: grad_bias, grad_weight;
  3. one elementwise pass: dx = k·dy' + b·(x - mean) + c, and dy' as the residual's gradient.

Grids: the reductions launch (channel tiles, chunks) with chunks bounded by the launcher; the
elementwise passes launch one flat axis of channel tiles x units (axis 0 allows 2^31 - 1
programs; axes 1 and 2 only 65535, which N or the H·W tiles of a large map would exceed).
"""

import triton
import triton.language as tl


@triton.jit
def _tile(n, offs_c, offs_hw, stride_n, stride_c, stride_hw):
    return (tl.cast(n, tl.int64) * stride_n + offs_c.to(tl.int64)[:, None] * stride_c
            + offs_hw.to(tl.int64)[None, :] * stride_hw)


@triton.jit
def _merge(mean, var, count, other_mean, other_var, other_count):
    """Chan's parallel combination in variance form (weights wa + wb = 1, the spread term
    (δ·√(wa·wb))²): no intermediate exceeds the merged variance, so none overflows."""
    total = count + other_count
    wb = other_count / total
    wa = 1.0 - wb
    delta = other_mean - mean
    spread = delta * tl.sqrt(wa * wb)
    return mean + delta * wb, var * wa + other_var * wb + spread * spread, total


@triton.jit
def bn_partial_sums_kernel(
    x_ptr, grad_ptr, out_ptr, mean_ptr, partial_ptr, first_ptr, second_ptr, var_ptr,
    C, HW, stride_n, stride_c, stride_hw, units, units_per_chunk, eps,
    BACKWARD: tl.constexpr, RELU: tl.constexpr, FINALIZE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Forward: partial[chunk, 0|1|2, c] = the chunk's mean (less the pivot), biased variance, count.
    Backward: partial[chunk, 0|1, c] = Σdy', Σdy'·(x - mean).
    FINALIZE (one chunk: the whole channel): the finalize kernel's outputs instead, written here
    (forward: first = mean, second = biased variance; backward: first = Σdy', second = Σdy'·x̂,
    with var_ptr the saved variance), so a small input takes one launch fewer."""
    pid_c = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    hw_tiles = tl.cdiv(HW, BLOCK_HW)
    u_begin = chunk * units_per_chunk
    u_end = tl.minimum(u_begin + units_per_chunk, units)
    if BACKWARD:
        centre = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
        acc1 = tl.zeros((BLOCK_C, BLOCK_HW), tl.float32)
        acc2 = tl.zeros((BLOCK_C, BLOCK_HW), tl.float32)
        for u in range(u_begin, u_end):
            n = u // hw_tiles
            offs_hw = (u - n * hw_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (offs_hw < HW)[None, :]
            offsets = _tile(n, offs_c, offs_hw, stride_n, stride_c, stride_hw)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                o = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                g = tl.where(o > 0.0, g, 0.0)
            acc1 += g
            acc2 += g * tl.where(mask, x - centre[:, None], 0.0)
        if FINALIZE:
            saved_var = tl.load(var_ptr + offs_c, mask=c_mask, other=1.0)
            tl.store(first_ptr + offs_c, tl.sum(acc1, axis=1), mask=c_mask)
            tl.store(second_ptr + offs_c, tl.sum(acc2, axis=1) * (1.0 / tl.sqrt(saved_var + eps)), mask=c_mask)
        else:
            base = partial_ptr + chunk.to(tl.int64) * 2 * C
            tl.store(base + offs_c, tl.sum(acc1, axis=1), mask=c_mask)
            tl.store(base + C + offs_c, tl.sum(acc2, axis=1), mask=c_mask)
    else:
        # shifted by the pivot p = x[0, c, 0]: a channel with a large mean loses nothing to rounding
        pivot = tl.load(x_ptr + offs_c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(tl.float32)
        count = 0.0
        mean = tl.zeros((BLOCK_C,), tl.float32)
        var = tl.zeros((BLOCK_C,), tl.float32)
        for u in range(u_begin, u_end):
            n = u // hw_tiles
            hw0 = (u - n * hw_tiles) * BLOCK_HW
            offs_hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (offs_hw < HW)[None, :]
            offsets = _tile(n, offs_c, offs_hw, stride_n, stride_c, stride_hw)
            x = tl.where(mask, tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - pivot[:, None], 0.0)
            tile_count = tl.minimum(HW - hw0, BLOCK_HW).to(tl.float32)
            inv = 1.0 / tile_count
            tile_mean = tl.sum(x * inv, axis=1)
            d = tl.where(mask, (x - tile_mean[:, None]) * tl.sqrt(inv), 0.0)
            tile_var = tl.sum(d * d, axis=1)
            mean, var, count = _merge(mean, var, count, tile_mean, tile_var, tile_count)
        if FINALIZE:
            tl.store(first_ptr + offs_c, mean + pivot, mask=c_mask)
            tl.store(second_ptr + offs_c, var, mask=c_mask)
        else:
            base = partial_ptr + chunk.to(tl.int64) * 3 * C
            tl.store(base + offs_c, mean, mask=c_mask)
            tl.store(base + C + offs_c, var, mask=c_mask)
            tl.store(base + 2 * C + offs_c, tl.zeros((BLOCK_C,), tl.float32) + count, mask=c_mask)


@triton.jit
def bn_finalize_kernel(
    x_ptr, partial_ptr, first_ptr, second_ptr, var_ptr, C, chunks, stride_c, eps,
    BACKWARD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chunks merged in order. Forward: first = mean, second = biased variance.
    Backward (var_ptr = the saved variance): first = Σdy' (grad_bias), second = Σdy'·x̂ (grad_weight)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    if BACKWARD:
        s1 = tl.zeros((BLOCK_C,), tl.float32)
        s2 = tl.zeros((BLOCK_C,), tl.float32)
        for chunk in range(0, chunks):
            base = partial_ptr + chunk * 2 * C
            s1 += tl.load(base + offs_c, mask=c_mask, other=0.0)
            s2 += tl.load(base + C + offs_c, mask=c_mask, other=0.0)
        var = tl.load(var_ptr + offs_c, mask=c_mask, other=1.0)
        tl.store(first_ptr + offs_c, s1, mask=c_mask)
        tl.store(second_ptr + offs_c, s2 * (1.0 / tl.sqrt(var + eps)), mask=c_mask)
    else:
        n = tl.zeros((BLOCK_C,), tl.float32)
        mean = tl.zeros((BLOCK_C,), tl.float32)
        var = tl.zeros((BLOCK_C,), tl.float32)
        for chunk in range(0, chunks):
            base = partial_ptr + chunk * 3 * C
            mean, var, n = _merge(mean, var, n, tl.load(base + offs_c, mask=c_mask, other=0.0),
                                  tl.load(base + C + offs_c, mask=c_mask, other=0.0),
                                  tl.load(base + 2 * C + offs_c, mask=c_mask, other=1.0))
        mean += tl.load(x_ptr + offs_c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(tl.float32)  # the pivot
        tl.store(first_ptr + offs_c, mean, mask=c_mask)
        tl.store(second_ptr + offs_c, var, mask=c_mask)


@triton.jit
def _program_tile(C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(offs_c, n, offs_hw) of this program in the flat grid of channel tiles x units."""
    pid = tl.program_id(0)
    c_tiles = tl.cdiv(C, BLOCK_C)
    hw_tiles = tl.cdiv(HW, BLOCK_HW)
    unit = pid // c_tiles
    n = unit // hw_tiles
    offs_c = (pid - unit * c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_hw = (unit - n * hw_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return offs_c, n, offs_hw


@triton.jit
def bn_forward_kernel(
    x_ptr, residual_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    C, HW, stride_n, stride_c, stride_hw, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """out = act(x·scale + shift (+ residual)), scale = w/sqrt(var+eps), shift = b - mean·scale."""
    offs_c, n, offs_hw = _program_tile(C, HW, BLOCK_C, BLOCK_HW)
    c_mask = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32) + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    mask = c_mask[:, None] & (offs_hw < HW)[None, :]
    offsets = _tile(n, offs_c, offs_hw, stride_n, stride_c, stride_hw)
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
    offs_c, n, offs_hw = _program_tile(C, HW, BLOCK_C, BLOCK_HW)
    c_mask = offs_c < C
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32) + eps)
    k = invstd
    if HAS_WEIGHT:
        k = k * tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    mask = c_mask[:, None] & (offs_hw < HW)[None, :]
    offsets = _tile(n, offs_c, offs_hw, stride_n, stride_c, stride_hw)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(o > 0.0, g, 0.0)
    if TRAINING:
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        b = -k * invstd * tl.load(sum_dy_xhat_ptr + offs_c, mask=c_mask, other=0.0) / count
        c = -k * tl.load(sum_dy_ptr + offs_c, mask=c_mask, other=0.0) / count
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dx = k[:, None] * g + b[:, None] * (x - mean[:, None]) + c[:, None]
    else:
        dx = k[:, None] * g
    tl.store(grad_x_ptr + offsets, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if WRITE_RESIDUAL:
        tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_update_stats_kernel(
    running_mean_ptr, running_var_ptr, mean_ptr, var_ptr, num_batches_ptr, C, momentum, unbias,
    CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """In place, per channel: r = (1 - f)·r + f·s with s the batch mean or the unbiased batch
    variance (var·unbias); f = momentum, or 1 / num_batches_tracked (CUMULATIVE: read here, on
    the device, so momentum=None needs no host read). csrc/divco/batch_norm_math.h's
    running_update is the same formula."""
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < C
    if CUMULATIVE:
        batches = tl.load(num_batches_ptr).to(tl.float64)
        factor = tl.where(batches > 0, 1.0 / batches, 1.0).to(tl.float32)
    else:
        factor = momentum
    running_mean = tl.load(running_mean_ptr + offs, mask=mask)
    running_var = tl.load(running_var_ptr + offs, mask=mask)
    mean = tl.load(mean_ptr + offs, mask=mask)
    var = tl.load(var_ptr + offs, mask=mask)
    tl.store(running_mean_ptr + offs, (1.0 - factor) * running_mean + factor * mean, mask=mask)
    tl.store(running_var_ptr + offs, (1.0 - factor) * running_var + factor * (var * unbias), mask=mask)
