"""Triton kernels of the ensembles and their gradients: one program per sample, tiles of K.

Modes (z [N, S, K] -> out [N, K]); the geometric mean needs no per-branch softmax because
mean_s log softmax(z_s) = mean_s z_s - const, so geo_mean = softmax(mean_s z_s):
  MEAN_LOGITS  mean_s z_s
  MEAN_PROBS   mean_s softmax(z_s)            (pass 1: per-branch max / Σexp)
  GEO_MEAN     softmax(mean_s z_s)            (pass 1: max / Σexp of the mean)
  MAX          max_s z_s                      (gradient to the first maximal branch)
Backward (g = dL/dout):
  MEAN_LOGITS  g / S
  MEAN_PROBS   (1/S) p_s (g - <p_s, g>)
  GEO_MEAN     (1/S) o (g - <o, g>), o the output
  MAX          g on the first branch attaining the max, 0 elsewhere
"""

import triton
import triton.language as tl

MEAN_LOGITS = tl.constexpr(0)
MEAN_PROBS = tl.constexpr(1)
GEO_MEAN = tl.constexpr(2)
MAX = tl.constexpr(3)
MODE_IDS = {"mean_logits": 0, "mean_probs": 1, "geo_mean": 2, "max": 3}


@triton.jit
def _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K):
    """[BLOCK_S, BLOCK_K] float32; classes past K are -inf, padded branches -inf too."""
    mask = (offs_s < S)[:, None] & (offs_k < K)[None, :]
    ptrs = row_ptr + offs_s.to(tl.int64)[:, None] * stride_s + offs_k.to(tl.int64)[None, :] * stride_k
    return tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _mean_over_branches(z, s_mask, inv_s):
    return tl.sum(tl.where(s_mask[:, None], z, 0.0), axis=0) * inv_s


@triton.jit
def _max_over_branches(z, offs_s, s_mask):
    """(max over branches, index of the first maximal branch); NaN anywhere in a column wins."""
    best = tl.max(z, axis=0)
    first = tl.min(tl.where(z == best[None, :], offs_s[:, None], 2147483647), axis=0)
    column_nan = tl.max(tl.where(s_mask[:, None] & (z != z), 1, 0), axis=0) > 0
    return tl.where(column_nan, float("nan"), best), first


@triton.jit
def _row_statistics(row_ptr, stride_s, stride_k, offs_s, base_k, S, K, inv_s, g_row_ptr,
                    MODE: tl.constexpr, NORMALISED: tl.constexpr, WITH_GRAD: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Online (max, Σexp, Σexp·g) per branch (MEAN_PROBS) or of the mean logits (GEO_MEAN).

    Modes that need no softmax (NORMALISED false) skip the pass and get placeholders."""
    s_mask = offs_s < S
    if MODE == MEAN_PROBS:
        m = tl.full((BLOCK_S,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_S,), tl.float32)
        dot = tl.zeros((BLOCK_S,), tl.float32)
    else:
        m = tl.full((1,), float("-inf"), tl.float32)
        total = tl.zeros((1,), tl.float32)
        dot = tl.zeros((1,), tl.float32)
    num_tiles = tl.cdiv(K, BLOCK_K) if NORMALISED else 0
    for tile in range(0, num_tiles):
        offs_k = tile * BLOCK_K + base_k
        k_mask = offs_k < K
        z = _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
        if MODE == MEAN_PROBS:
            x = tl.where(s_mask[:, None], z, 0.0)
            x = tl.where(k_mask[None, :], x, float("-inf"))
        else:
            x = _mean_over_branches(z, s_mask, inv_s)
            x = tl.where(k_mask, x, float("-inf"))[None, :]
        m_new = tl.maximum(m, tl.max(x, axis=1))
        e = tl.exp(x - m_new[:, None])
        scale = tl.exp(m - m_new)
        total = total * scale + tl.sum(e, axis=1)
        if WITH_GRAD:
            g = tl.load(g_row_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            dot = dot * scale + tl.sum(e * g[None, :], axis=1)
        m = m_new
    return m, total, dot


@triton.jit
def ensemble_kernel(
    logits_ptr, stride_n, stride_s, stride_k,
    out_ptr,  # [N, K] contiguous, logits dtype
    S, K,
    MODE: tl.constexpr, NORMALISED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + n * stride_n
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    base_k = tl.arange(0, BLOCK_K)
    inv_s = 1.0 / S
    m, total, dot = _row_statistics(row_ptr, stride_s, stride_k, offs_s, base_k, S, K, inv_s, out_ptr,
                                    MODE, NORMALISED, False, BLOCK_S, BLOCK_K)
    log_total = tl.log(total)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + base_k
        k_mask = offs_k < K
        z = _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
        if MODE == MEAN_LOGITS:
            out = _mean_over_branches(z, s_mask, inv_s)
        elif MODE == MEAN_PROBS:
            p = tl.exp(z - m[:, None] - log_total[:, None])
            out = tl.sum(tl.where(s_mask[:, None], p, 0.0), axis=0) * inv_s
        elif MODE == GEO_MEAN:
            out = tl.exp(_mean_over_branches(z, s_mask, inv_s) - m - log_total)
        else:
            out, first = _max_over_branches(z, offs_s, s_mask)
        tl.store(out_ptr + n * K + offs_k, out.to(out_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def ensemble_backward_kernel(
    grad_out_ptr,  # [N, K] contiguous
    logits_ptr, stride_n, stride_s, stride_k,
    grad_ptr,  # [N, S, K] contiguous, logits dtype
    S, K,
    MODE: tl.constexpr, NORMALISED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + n * stride_n
    g_row_ptr = grad_out_ptr + n * K
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    base_k = tl.arange(0, BLOCK_K)
    inv_s = 1.0 / S
    m, total, dot = _row_statistics(row_ptr, stride_s, stride_k, offs_s, base_k, S, K, inv_s, g_row_ptr,
                                    MODE, NORMALISED, True, BLOCK_S, BLOCK_K)
    log_total = tl.log(total)
    expected_g = dot / total  # <p_s, g> per branch (MEAN_PROBS) or <o, g> (GEO_MEAN)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + base_k
        k_mask = offs_k < K
        g = tl.load(g_row_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if MODE == MEAN_LOGITS:
            grad = tl.zeros((BLOCK_S, BLOCK_K), tl.float32) + g[None, :] * inv_s
        else:
            z = _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
            if MODE == MEAN_PROBS:
                p = tl.exp(z - m[:, None] - log_total[:, None])
                grad = inv_s * p * (g[None, :] - expected_g[:, None])
            elif MODE == GEO_MEAN:
                o = tl.exp(_mean_over_branches(z, s_mask, inv_s) - m - log_total)
                grad = tl.zeros((BLOCK_S, BLOCK_K), tl.float32) + (inv_s * o * (g - expected_g))[None, :]
            else:
                best, first = _max_over_branches(z, offs_s, s_mask)
                grad = tl.where(offs_s[:, None] == first[None, :], g[None, :], 0.0)
        mask = s_mask[:, None] & k_mask[None, :]
        ptrs = grad_ptr + n * S * K + offs_s.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(ptrs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
