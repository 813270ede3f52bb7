"""Triton kernels of the ensembles and their gradients: one program per sample, tiles of K.

Modes (z [N, S, K] -> out [N, K]); the geometric mean needs no per-branch softmax because
mean_s log softmax(z_s) = mean_s z_s - const, so geo_mean = softmax(mean_s z_s):
  MEAN_LOGITS  Σ_s z_s / S                   (divided before the sum: no overflow near ±3e38)
  MEAN_PROBS   mean_s softmax(z_s)            (pass 1: per-branch max / Σexp)
  GEO_MEAN     softmax(Σ_s z_s / S)           (pass 1: max / Σexp of the mean)
  MAX          max_s z_s
  MAX_PROBS    max_s softmax(z_s)             (pass 1: per-branch max / Σexp; no renormalisation)
  VOTE         Σ_s [t_s = k] / S              (pass 1: each branch's top-1 class t_s, torch.argmax's rule)
With per-branch weights (HAS_WEIGHTS; normalised here, w_s / Σ_t w_t) the means become Σ_s w_s ·:
mean_logits Σ_s w_s z_s, mean_probs Σ_s w_s p_s, geo_mean softmax(Σ_s w_s z_s) (the weighted
log-normalisers only shift every class alike), vote Σ_s w_s [t_s = k]. A branch of weight 0 adds
exactly 0 (also where its logits are ±inf or NaN) and gets gradient 0.
Backward (g = dL/dout; f(k) the branch that holds the max of column k):
  MEAN_LOGITS  g / S
  MEAN_PROBS   (1/S) p_s (g - <p_s, g>)
  GEO_MEAN     (1/S) o (g - <o, g>), o the output
  MAX          g on branch f(k), 0 elsewhere
  MAX_PROBS    [f(k) = s] g p_s - p_s Σ_j [f(j) = s] g_j p_sj   (pass 2: that dot per branch)
  VOTE         0 (piecewise constant)
  (weighted: w_s in place of 1/S)

NaN: a NaN counts as the maximum (torch.max's rule): f(k) is the first branch holding NaN
if any, else the first maximal branch. tl.max ignores NaN on GPUs but propagates it in the
interpreter, so every max here is taken over NaN-free values and NaN is handled explicitly:
both give the same answer. A -inf logit has probability exactly 0; a row entirely -inf in a
branch is undefined (NaN probabilities), never a NaN from -inf - -inf elsewhere.
"""

import triton
import triton.language as tl

from divco.vocabulary import ENSEMBLE_MODES

MEAN_LOGITS = tl.constexpr(0)
MEAN_PROBS = tl.constexpr(1)
GEO_MEAN = tl.constexpr(2)
MAX = tl.constexpr(3)
MAX_PROBS = tl.constexpr(4)
VOTE = tl.constexpr(5)
#: The constexpr id of each ensemble mode (the vocabulary's order).
MODE_IDS = {mode: index for index, mode in enumerate(ENSEMBLE_MODES)}
assert [MODE_IDS[m] for m in ("mean_logits", "mean_probs", "geo_mean", "max", "max_probs", "vote")] == [0, 1, 2, 3, 4, 5]
#: Modes whose kernels need softmax statistics of the row (pass 1).
NORMALISED_MODES = frozenset({"mean_probs", "geo_mean", "max_probs"})


@triton.jit
def _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K):
    """[BLOCK_S, BLOCK_K] float32; classes past K are -inf, padded branches -inf too."""
    mask = (offs_s < S)[:, None] & (offs_k < K)[None, :]
    ptrs = row_ptr + offs_s.to(tl.int64)[:, None] * stride_s + offs_k.to(tl.int64)[None, :] * stride_k
    return tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _mean_over_branches(z, s_mask, inv_s):
    """Σ_s z_s / S, each term divided first so that the sum of logits near ±3e38 cannot overflow."""
    return tl.sum(tl.where(s_mask[:, None], z * inv_s, 0.0), axis=0)


@triton.jit
def _weighted_sum_over_branches(x, w):
    """Σ_s w_s x_s over axis 0 (w [BLOCK_S], 0 on padded branches); a branch of weight 0 adds
    exactly 0, whatever its x (0 · inf would be NaN)."""
    return tl.sum(tl.where((w != 0.0)[:, None], x * w[:, None], 0.0), axis=0)


@triton.jit
def _branch_mean(z, s_mask, inv_s, w, HAS_WEIGHTS: tl.constexpr):
    """The (weighted) mean of the logits over branches: Σ_s w_s z_s, or Σ_s z_s / S."""
    if HAS_WEIGHTS:
        return _weighted_sum_over_branches(z, w)
    else:
        return _mean_over_branches(z, s_mask, inv_s)


@triton.jit
def _branch_weights(weights_ptr, offs_s, s_mask, HAS_WEIGHTS: tl.constexpr, BLOCK_S: tl.constexpr):
    """[BLOCK_S] float32 w_s · (1 / Σ_t w_t) (0 on padded branches); a placeholder without weights.
    (The native operators normalise on the device before their kernels: op_common.cpp.)"""
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + offs_s, mask=s_mask, other=0.0).to(tl.float32)
        return w * (1.0 / tl.sum(w, axis=0))
    else:
        return tl.zeros((BLOCK_S,), tl.float32)


@triton.jit
def _nan_free_max(x, axis: tl.constexpr):
    """tl.max over ``axis`` of x with NaN replaced by -inf: the same on GPUs and the interpreter."""
    return tl.max(tl.where(x == x, x, float("-inf")), axis=axis)


@triton.jit
def _max_over_branches(z, offs_s, s_mask):
    """(max over branches, index of the branch holding it) per column, torch.max's rule: a NaN
    is the maximum (the first NaN branch wins), else the first maximal branch."""
    is_nan = s_mask[:, None] & (z != z)
    best = _nan_free_max(z, 0)
    first_max = tl.min(tl.where(s_mask[:, None] & (z == best[None, :]), offs_s[:, None], 2147483647), axis=0)
    first_nan = tl.min(tl.where(is_nan, offs_s[:, None], 2147483647), axis=0)
    column_nan = first_nan < 2147483647
    return tl.where(column_nan, float("nan"), best), tl.where(column_nan, first_nan, first_max)


@triton.jit
def _row_statistics(row_ptr, stride_s, stride_k, offs_s, base_k, S, K, inv_s, w, g_row_ptr,
                    MODE: tl.constexpr, NORMALISED: tl.constexpr, WITH_GRAD: tl.constexpr,
                    HAS_WEIGHTS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Online (max, Σexp, Σexp·g) per branch (MEAN_PROBS, MAX_PROBS) or of the (weighted) mean
    logits (GEO_MEAN).

    Modes that need no softmax (NORMALISED false) skip the pass and get placeholders."""
    s_mask = offs_s < S
    if MODE == GEO_MEAN:
        m = tl.full((1,), float("-inf"), tl.float32)
        total = tl.zeros((1,), tl.float32)
        dot = tl.zeros((1,), tl.float32)
    else:
        m = tl.full((BLOCK_S,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_S,), tl.float32)
        dot = tl.zeros((BLOCK_S,), tl.float32)
    num_tiles = tl.cdiv(K, BLOCK_K) if NORMALISED else 0
    for tile in range(0, num_tiles):
        offs_k = tile * BLOCK_K + base_k
        k_mask = offs_k < K
        z = _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
        if MODE == GEO_MEAN:
            x = _branch_mean(z, s_mask, inv_s, w, HAS_WEIGHTS)
            x = tl.where(k_mask, x, float("-inf"))[None, :]
        else:
            x = tl.where(s_mask[:, None], z, 0.0)
            x = tl.where(k_mask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, _nan_free_max(x, 1))
        # A branch whose classes so far are all -inf keeps m = -inf: shift by 0 there, so that
        # -inf - -inf never makes a NaN (its exps are 0 and the sum stays 0).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(x - shift[:, None])
        scale = tl.exp(m - shift)
        total = total * scale + tl.sum(e, axis=1)
        if WITH_GRAD:
            g = tl.load(g_row_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            dot = dot * scale + tl.sum(tl.where(k_mask[None, :], e * g[None, :], 0.0), axis=1)
        m = m_new
    return m, total, dot


@triton.jit
def _branch_top1(row_ptr, stride_s, stride_k, offs_s, base_k, S, K, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_S] each branch's top-1 class, torch.argmax's rule: the first NaN class if any,
    else the first maximal class (0 for a branch entirely -inf). Tiles are walked in class
    order, so an earlier tile keeps a tie."""
    best = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    best_k = tl.zeros((BLOCK_S,), tl.int32)
    found_nan = tl.zeros((BLOCK_S,), tl.int1)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + base_k
        k_mask = (offs_k < K)[None, :]
        z = _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
        tile_best = _nan_free_max(z, 1)
        first_max = tl.min(tl.where(k_mask & (z == tile_best[:, None]), offs_k[None, :], 2147483647), axis=1)
        first_nan = tl.min(tl.where(k_mask & (z != z), offs_k[None, :], 2147483647), axis=1)
        tile_nan = first_nan < 2147483647
        take = (found_nan == 0) & (tile_nan | (tile_best > best))
        best_k = tl.where(take, tl.where(tile_nan, first_nan, first_max), best_k)
        best = tl.where(take, tile_best, best)
        found_nan = found_nan | tile_nan
    return best_k


@triton.jit
def _probabilities(z, m, log_total):
    """softmax(z_s) of one tile from the row statistics: exactly 0 where z = -inf."""
    return tl.exp(z - m[:, None] - log_total[:, None])


@triton.jit
def ensemble_kernel(
    logits_ptr, stride_n, stride_s, stride_k,
    weights_ptr,  # [S] float32 (read only when HAS_WEIGHTS)
    out_ptr,  # [N, K] contiguous, logits dtype
    S, K,
    MODE: tl.constexpr, NORMALISED: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + n * stride_n
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    base_k = tl.arange(0, BLOCK_K)
    inv_s = 1.0 / S
    w = _branch_weights(weights_ptr, offs_s, s_mask, HAS_WEIGHTS, BLOCK_S)
    m, total, dot = _row_statistics(row_ptr, stride_s, stride_k, offs_s, base_k, S, K, inv_s, w, out_ptr,
                                    MODE, NORMALISED, False, HAS_WEIGHTS, BLOCK_S, BLOCK_K)
    log_total = tl.log(total)
    if MODE == VOTE:
        top1 = _branch_top1(row_ptr, stride_s, stride_k, offs_s, base_k, S, K, BLOCK_S, BLOCK_K)
        if HAS_WEIGHTS:
            ballot = w
        else:
            ballot = tl.where(s_mask, 1.0, 0.0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + base_k
        k_mask = offs_k < K
        if MODE == VOTE:
            votes = tl.where(s_mask[:, None] & (top1[:, None] == offs_k[None, :]), ballot[:, None], 0.0)
            out = tl.sum(votes, axis=0)
            if not HAS_WEIGHTS:
                out = out / S  # a count of votes: exact, then one rounding
        else:
            z = _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
            if MODE == MEAN_LOGITS:
                out = _branch_mean(z, s_mask, inv_s, w, HAS_WEIGHTS)
            elif MODE == MEAN_PROBS:
                p = _probabilities(z, m, log_total)
                if HAS_WEIGHTS:
                    out = _weighted_sum_over_branches(p, w)
                else:
                    out = tl.sum(tl.where(s_mask[:, None], p, 0.0), axis=0) * inv_s
            elif MODE == GEO_MEAN:
                out = tl.exp(_branch_mean(z, s_mask, inv_s, w, HAS_WEIGHTS) - m - log_total)
            elif MODE == MAX:
                out, first = _max_over_branches(z, offs_s, s_mask)
            else:
                out, first = _max_over_branches(_probabilities(z, m, log_total), offs_s, s_mask)
        tl.store(out_ptr + n * K + offs_k, out.to(out_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def ensemble_backward_kernel(
    grad_out_ptr,  # [N, K] contiguous
    logits_ptr, stride_n, stride_s, stride_k,
    weights_ptr,  # [S] float32 (read only when HAS_WEIGHTS)
    grad_ptr,  # [N, S, K] contiguous, logits dtype
    S, K,
    MODE: tl.constexpr, NORMALISED: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + n * stride_n
    g_row_ptr = grad_out_ptr + n * K
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    base_k = tl.arange(0, BLOCK_K)
    inv_s = 1.0 / S
    w = _branch_weights(weights_ptr, offs_s, s_mask, HAS_WEIGHTS, BLOCK_S)
    if HAS_WEIGHTS:
        branch_weight = w  # the factor of each branch's gradient
    else:
        branch_weight = tl.where(s_mask, inv_s, 0.0)
    m, total, dot = _row_statistics(row_ptr, stride_s, stride_k, offs_s, base_k, S, K, inv_s, w, g_row_ptr,
                                    MODE, NORMALISED, MODE != MAX_PROBS, HAS_WEIGHTS, BLOCK_S, BLOCK_K)
    log_total = tl.log(total)
    expected_g = dot / total  # <p_s, g> per branch (MEAN_PROBS) or <o, g> (GEO_MEAN)
    if MODE == MAX_PROBS:
        # Σ_j [f(j) = s] g_j p_sj per branch: needs the final statistics, hence its own pass.
        expected_g = tl.zeros((BLOCK_S,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + base_k
            g = tl.load(g_row_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            p = _probabilities(_load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K), m, log_total)
            best, first = _max_over_branches(p, offs_s, s_mask)
            routed = (offs_s[:, None] == first[None, :]) & (offs_k < K)[None, :]
            expected_g += tl.sum(tl.where(routed, g[None, :] * p, 0.0), axis=1)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + base_k
        k_mask = offs_k < K
        g = tl.load(g_row_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if MODE == MEAN_LOGITS:
            if HAS_WEIGHTS:
                grad = branch_weight[:, None] * g[None, :]
            else:
                grad = tl.zeros((BLOCK_S, BLOCK_K), tl.float32) + g[None, :] * inv_s
        elif MODE == VOTE:
            grad = tl.zeros((BLOCK_S, BLOCK_K), tl.float32)  # piecewise constant
        else:
            z = _load_tile(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
            if MODE == MEAN_PROBS:
                p = _probabilities(z, m, log_total)
                if HAS_WEIGHTS:
                    grad = branch_weight[:, None] * p * (g[None, :] - expected_g[:, None])
                else:
                    grad = inv_s * p * (g[None, :] - expected_g[:, None])
            elif MODE == GEO_MEAN:
                o = tl.exp(_branch_mean(z, s_mask, inv_s, w, HAS_WEIGHTS) - m - log_total)
                if HAS_WEIGHTS:
                    grad = branch_weight[:, None] * (o * (g - expected_g))[None, :]
                else:
                    grad = tl.zeros((BLOCK_S, BLOCK_K), tl.float32) + (inv_s * o * (g - expected_g))[None, :]
            elif MODE == MAX:
                best, first = _max_over_branches(z, offs_s, s_mask)
                grad = tl.where(offs_s[:, None] == first[None, :], g[None, :], 0.0)
            else:
                p = _probabilities(z, m, log_total)
                best, first = _max_over_branches(p, offs_s, s_mask)
                routed = tl.where(offs_s[:, None] == first[None, :], g[None, :] * p, 0.0)
                grad = routed - p * expected_g[:, None]
        if HAS_WEIGHTS:
            grad = tl.where((branch_weight != 0.0)[:, None], grad, 0.0)  # weight 0: no part, no gradient
        mask = s_mask[:, None] & k_mask[None, :]
        ptrs = grad_ptr + n * S * K + offs_s.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(ptrs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
