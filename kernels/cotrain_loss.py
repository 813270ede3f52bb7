"""Triton kernel of the fused co-training loss: one program per sample, all branches at once.

The program for sample n holds a [BLOCK_S, BLOCK_K] tile (every branch, a slice of the
classes) and walks the classes in tiles with an online softmax, so K is unbounded:

  pass 1  per-branch running max / sum-of-exps (for softmax(z) and softmax(z/T)), top-1,
          the mean-of-logits ensemble (written out) and its top-1, soft-target sum/argmax;
  pass 2  p_s, p̄ and the co-training partials (KL(p_s||p̄) for "js", Σ(p_s-p̄)·log p_s for
          "kl"), soft-target cross-entropy; for "kl" also the gradient;
  pass 3  ("js" only) the gradient, which needs KL(p_s||p̄) from the whole row.

When every class fits in one tile (SINGLE_TILE) the logits are read once and kept in
registers for all three steps. The gradient dloss/dlogits is written during the forward
pass (gradient-in-forward): backward only scales it by grad_output.

Per-sample results (CE per branch, J, hits) go to small [N, ...] buffers that the host
reduces with ordinary (deterministic) torch sums; no atomics. With per-sample weights
(HAS_SAMPLE_WEIGHT) row n's CE and J are stored times v_n and its gradient is scaled by v_n
in the store; without them nothing is multiplied (the same bits as before weights existed).
Math (u = z/T, p_s = softmax(u_s), q_s = softmax(z_s), y the target distribution):
  dCE_s/dz_s       = (Σ_k y_k) q_s - y
  "js" dJ/du_s     = (1/S) p_s [ (log p_s - log p̄) - KL(p_s||p̄) ]
  "kl" dJ/du_s     = S/(S-1) (p_s - p̄)
"""

import triton
import triton.language as tl


@triton.jit
def _load_logits(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K):
    """[BLOCK_S, BLOCK_K] float32 tile; classes past K are -inf, padded branches are 0."""
    s_mask = offs_s < S
    k_mask = offs_k < K
    ptrs = row_ptr + offs_s.to(tl.int64)[:, None] * stride_s + offs_k.to(tl.int64)[None, :] * stride_k
    z = tl.load(ptrs, mask=s_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    return tl.where(k_mask[None, :], z, float("-inf"))


@triton.jit
def _first_argmax(values, offs_k, axis: tl.constexpr):
    """(max, first index of the max) along ``axis``, torch.argmax's rule: the first max on
    ties, and a NaN is the max (the first NaN wins). tl.max alone ignores NaN on GPUs but
    propagates it in the interpreter; this gives the same answer on both."""
    is_nan = values != values
    best = tl.max(tl.where(is_nan, float("-inf"), values), axis=axis)  # NaN-free: GPU == interpreter
    if axis == 1:
        hit = values == best[:, None]
        index = tl.min(tl.where(hit, offs_k[None, :], 2147483647), axis=1)
        first_nan = tl.min(tl.where(is_nan, offs_k[None, :], 2147483647), axis=1)
    else:
        hit = values == best
        index = tl.min(tl.where(hit, offs_k, 2147483647), axis=0)
        first_nan = tl.min(tl.where(is_nan, offs_k, 2147483647), axis=0)
    has_nan = first_nan < 2147483647
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, first_nan, index)


@triton.jit
def _merge_argmax(best, index, tile_best, tile_index):
    """Keep the earlier tile's index unless the new tile is strictly larger or holds the first NaN."""
    better = (tile_best > best) | ((tile_best != tile_best) & (best == best))  # a first NaN wins too
    return tl.where(better, tile_best, best), tl.where(better, tile_index, index)


@triton.jit
def _online_softmax(z, m, sum_z, sum_u, inv_t, UNIT_TEMPERATURE: tl.constexpr):
    """Merge one tile into running (max, Σexp(z-max), Σexp((z-max)/T)) per branch.

    The max ignores NaN (a NaN still reaches the sums, so NaN in gives NaN out on GPUs and in
    the interpreter alike). A branch whose classes so far are all -inf keeps max = -inf and is
    shifted by 0, so -inf - -inf never makes a NaN: its exps are 0 and its sums stay 0."""
    m_new = tl.maximum(m, tl.max(tl.where(z == z, z, float("-inf")), axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    shifted = z - shift[:, None]
    sum_z = sum_z * tl.exp(m - shift) + tl.sum(tl.exp(shifted), axis=1)
    if UNIT_TEMPERATURE:
        sum_u = sum_z
    else:
        sum_u = sum_u * tl.exp((m - shift) * inv_t) + tl.sum(tl.exp(shifted * inv_t), axis=1)
    return m_new, sum_z, sum_u


@triton.jit
def _probabilities(z, m, log_sum_u, inv_t, s_mask, inv_s):
    """log p_s, p_s (0 on padded branches / classes) and p̄ for one tile."""
    log_p = (z - m[:, None]) * inv_t - log_sum_u[:, None]
    p = tl.where(s_mask[:, None], tl.exp(log_p), 0.0)
    p_bar = tl.sum(p, axis=0) * inv_s
    return log_p, p, p_bar


@triton.jit
def _contributes(p, p_bar):
    """Where p·log(p/p̄) is not 0: p = 0 gives 0, and so does a p̄ that underflowed to 0 (then
    p <= S·p̄ is a denormal or less). NaN compares unequal to 0, so NaN propagates."""
    return (p != 0.0) & (p_bar != 0.0)[None, :]


@triton.jit
def _cotrain_partial(log_p, p, p_bar, valid, KIND_KL: tl.constexpr):
    """Per-branch partial sums over this tile: KL(p_s||p̄) ("js") or Σ(p_s - p̄) log p_s ("kl")."""
    if KIND_KL:
        # a masked class (log p = -inf, from a -inf logit) adds 0; so does p = p̄
        terms = tl.where(valid & (p != p_bar[None, :]) & (log_p != float("-inf")), (p - p_bar[None, :]) * log_p, 0.0)
    else:
        terms = tl.where(valid & _contributes(p, p_bar), p * (log_p - tl.log(p_bar)[None, :]), 0.0)
    return tl.sum(terms, axis=1)


@triton.jit
def _write_grad(
    grad_row_ptr, z, offs_s, offs_k, S, K, m, log_sum_z, log_p, p, p_bar, row_term, enabled,
    y, y_sum, label, label_valid, ce_scale, cot_scale,
    SOFT_TARGET: tl.constexpr, KIND_KL: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
):
    """grad = (v_n/N) [ dCE/dz + w/T · dJ/du ] for one tile; ce_scale = v_n/N, cot_scale = w·c·v_n/(N·T)
    (v_n = 1 without per-sample weights).

    row_term: per branch, KL(p_s || p̄) ("js") or the masked mass m_s ("kl"), whole-row sums.
    Nothing is stored unless ``enabled``."""
    if UNIT_TEMPERATURE:
        q = p
    else:
        q = tl.exp(z - m[:, None] - log_sum_z[:, None])
    if SOFT_TARGET:
        g_ce = y_sum * q - y[None, :]
    else:
        one_hot = (offs_k[None, :] == label).to(tl.float32)
        g_ce = tl.where(label_valid, q - one_hot, float("nan"))
    if KIND_KL:
        g_cot = tl.where(log_p == float("-inf"), 0.0, p * (1.0 - row_term[:, None]) - p_bar[None, :])
    else:
        g_cot = tl.where(_contributes(p, p_bar), p * ((log_p - tl.log(p_bar)[None, :]) - row_term[:, None]), 0.0)
    grad = ce_scale * g_ce + cot_scale * g_cot
    mask = (offs_s < S)[:, None] & (offs_k < K)[None, :] & enabled
    ptrs = grad_row_ptr + offs_s.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, grad.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cotrain_loss_kernel(
    logits_ptr, stride_n, stride_s, stride_k,
    target_ptr, target_stride_n, target_stride_k,
    weight_ptr,
    sample_weight_ptr,  # [N] float32 per-sample weights v_n (read only when HAS_SAMPLE_WEIGHT)
    sample_weight_stride,
    ensemble_ptr,  # [N, K] contiguous, logits dtype
    grad_ptr,  # [N, S, K] contiguous, logits dtype (untouched unless COMPUTE_GRAD)
    ce_rows_ptr,  # [N, S] float32: per-sample cross-entropy of each branch
    cot_rows_ptr,  # [N] float32: per-sample co-training term J_n
    hits_ptr,  # [N, S + 1] int32: 1 where the top-1 prediction is right
    N, S, K,
    inv_t,  # 1 / temperature
    cot_coef,  # "js": 1/S; "kl": S/(S-1); 0 for S = 1 (J = 0)
    SOFT_TARGET: tl.constexpr,
    KIND_KL: tl.constexpr,
    UNIT_TEMPERATURE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_SAMPLE_WEIGHT: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + n * stride_n
    grad_row_ptr = grad_ptr + n * S * K
    target_row_ptr = target_ptr + n * target_stride_n
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    base_k = tl.arange(0, BLOCK_K)
    inv_s = 1.0 / S
    inv_n = 1.0 / N
    ce_scale = inv_n
    cot_scale = tl.load(weight_ptr).to(tl.float32) * cot_coef * inv_t * inv_n
    row_weight = 1.0
    if HAS_SAMPLE_WEIGHT:  # v_n scales the row's loss terms and its gradient
        row_weight = tl.load(sample_weight_ptr + n * sample_weight_stride).to(tl.float32)
        ce_scale = ce_scale * row_weight
        cot_scale = cot_scale * row_weight

    label = tl.zeros((), dtype=tl.int64)
    label_valid = True
    if not SOFT_TARGET:
        label = tl.load(target_row_ptr)
        label_valid = (label >= 0) & (label < K)

    # ---- pass 1: online softmax statistics, top-1, ensemble -------------------------------
    m = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    sum_z = tl.zeros((BLOCK_S,), tl.float32)
    sum_u = tl.zeros((BLOCK_S,), tl.float32)
    top = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    top_index = tl.zeros((BLOCK_S,), tl.int32)
    ens_top = tl.full((), float("-inf"), tl.float32)
    ens_index = tl.zeros((), tl.int32)
    y_sum = tl.zeros((), tl.float32)
    y_top = tl.full((), float("-inf"), tl.float32)
    y_index = tl.zeros((), tl.int32)
    num_tiles = 1 if SINGLE_TILE else tl.cdiv(K, BLOCK_K)
    z = tl.zeros((BLOCK_S, BLOCK_K), tl.float32)  # the single tile stays here
    y = tl.zeros((BLOCK_K,), tl.float32)
    masked_row = tl.zeros((), tl.int32)  # "kl": 1 if a branch has a -inf logit (its gradient needs m_s)
    for tile in range(0, num_tiles):
        offs_k = tile * BLOCK_K + base_k
        k_mask = offs_k < K
        z = _load_logits(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
        m, sum_z, sum_u = _online_softmax(z, m, sum_z, sum_u, inv_t, UNIT_TEMPERATURE)
        if KIND_KL:
            is_masked = s_mask[:, None] & k_mask[None, :] & (z == float("-inf"))
            masked_row = tl.maximum(masked_row, tl.max(tl.max(is_masked.to(tl.int32), axis=1), axis=0))
        tile_top, tile_index = _first_argmax(z, offs_k, 1)
        top, top_index = _merge_argmax(top, top_index, tile_top, tile_index)
        ens = tl.sum(tl.where(s_mask[:, None], z * inv_s, 0.0), axis=0)  # no overflow near ±3e38
        tl.store(ensemble_ptr + n * K + offs_k, ens.to(ensemble_ptr.dtype.element_ty), mask=k_mask)
        tile_top, tile_index = _first_argmax(ens, offs_k, 0)
        ens_top, ens_index = _merge_argmax(ens_top, ens_index, tile_top, tile_index)
        if SOFT_TARGET:
            y = tl.load(target_row_ptr + offs_k.to(tl.int64) * target_stride_k, mask=k_mask, other=0.0).to(tl.float32)
            y_sum += tl.sum(y, axis=0)
            tile_top, tile_index = _first_argmax(tl.where(k_mask, y, float("-inf")), offs_k, 0)
            y_top, y_index = _merge_argmax(y_top, y_index, tile_top, tile_index)

    log_sum_z = tl.log(sum_z)
    log_sum_u = tl.log(sum_u)
    if SOFT_TARGET:
        label = y_index.to(tl.int64)

    hits = (top_index.to(tl.int64) == label) & label_valid
    tl.store(hits_ptr + n * (S + 1) + offs_s, hits.to(tl.int32), mask=s_mask)
    ens_hit = (ens_index.to(tl.int64) == label) & label_valid
    tl.store(hits_ptr + n * (S + 1) + S, ens_hit.to(tl.int32))

    # ---- pass 2: probabilities, co-training partials, soft cross-entropy ------------------
    cot_partial = tl.zeros((BLOCK_S,), tl.float32)
    masked_mass = tl.zeros((BLOCK_S,), tl.float32)  # "kl": m_s = Σ_k p̄_k over the classes masked in branch s
    ce = tl.zeros((BLOCK_S,), tl.float32)
    for tile in range(0, num_tiles):
        offs_k = tile * BLOCK_K + base_k
        k_mask = offs_k < K
        if not SINGLE_TILE:
            z = _load_logits(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
            if SOFT_TARGET:
                y = tl.load(target_row_ptr + offs_k.to(tl.int64) * target_stride_k, mask=k_mask, other=0.0).to(tl.float32)
        valid = s_mask[:, None] & k_mask[None, :]
        log_p, p, p_bar = _probabilities(z, m, log_sum_u, inv_t, s_mask, inv_s)
        cot_partial += _cotrain_partial(log_p, p, p_bar, valid, KIND_KL)
        if KIND_KL:
            masked_mass += tl.sum(tl.where(valid & (log_p == float("-inf")), p_bar[None, :], 0.0), axis=1)
        if SOFT_TARGET:
            log_q = z - m[:, None] - log_sum_z[:, None]
            # y·log q := 0 where y = 0 (a -inf logit has log q = -inf)
            ce -= tl.sum(tl.where(valid & (y != 0.0)[None, :], y[None, :] * log_q, 0.0), axis=1)
        if COMPUTE_GRAD and (KIND_KL or SINGLE_TILE):
            # A single tile has the whole row; "kl" needs nothing from the rest of the row unless
            # a class is masked (m_s > 0: then pass 3 writes it).
            if SINGLE_TILE:
                enabled = True
            else:
                enabled = masked_row == 0
            _write_grad(
                grad_row_ptr, z, offs_s, offs_k, S, K, m, log_sum_z, log_p, p, p_bar,
                masked_mass if KIND_KL else cot_partial, enabled,
                y, y_sum, label, label_valid, ce_scale, cot_scale, SOFT_TARGET, KIND_KL, UNIT_TEMPERATURE,
            )

    if not SOFT_TARGET:
        # CE = logsumexp(z_s) - z_s[label] = (max - z[label]) + log Σexp(z - max): no cancellation.
        label_ptrs = row_ptr + offs_s.to(tl.int64) * stride_s + label * stride_k
        z_label = tl.load(label_ptrs, mask=s_mask & label_valid, other=0.0).to(tl.float32)
        ce = tl.where(label_valid, (m - z_label) + log_sum_z, float("nan"))
    cot_row = cot_coef * tl.sum(tl.where(s_mask, cot_partial, 0.0), axis=0)
    if HAS_SAMPLE_WEIGHT:
        ce = ce * row_weight
        cot_row = cot_row * row_weight
    tl.store(ce_rows_ptr + n * S + offs_s, ce, mask=s_mask)
    tl.store(cot_rows_ptr + n, cot_row)

    # ---- pass 3 (several tiles): the gradient needs KL(p_s || p̄) ("js") or m_s ("kl", rows with
    # a masked class) of the whole row
    if COMPUTE_GRAD and not SINGLE_TILE:
        num_grad_tiles = num_tiles * masked_row if KIND_KL else num_tiles
        for tile in range(0, num_grad_tiles):
            offs_k = tile * BLOCK_K + base_k
            z = _load_logits(row_ptr, stride_s, stride_k, offs_s, offs_k, S, K)
            if SOFT_TARGET:
                y = tl.load(target_row_ptr + offs_k.to(tl.int64) * target_stride_k, mask=offs_k < K, other=0.0).to(tl.float32)
            log_p, p, p_bar = _probabilities(z, m, log_sum_u, inv_t, s_mask, inv_s)
            _write_grad(
                grad_row_ptr, z, offs_s, offs_k, S, K, m, log_sum_z, log_p, p, p_bar,
                masked_mass if KIND_KL else cot_partial, True,
                y, y_sum, label, label_valid, ce_scale, cot_scale, SOFT_TARGET, KIND_KL, UNIT_TEMPERATURE,
            )
