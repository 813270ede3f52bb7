// The per-element and per-row math of the fused co-training loss and the ensembles,
// shared by the CPU kernels (cpu/) and the CUDA kernels (cuda/): the CPU tests check the
// same formulas the GPU runs.
//
// Notation (one row n): z[s][k] logits of branch s, u = z / T, p_s = softmax(u_s),
// q_s = softmax(z_s) (the cross-entropy uses no temperature), pbar = mean_s p_s.
// Every function is written so that NaN in gives NaN out: guards test `x == 0`, never
// `x > 0`, because a comparison with NaN is false.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define DIVCO_HOST_DEVICE __host__ __device__
#define DIVCO_INLINE __host__ __device__ __forceinline__
#else
#include <cmath>
#define DIVCO_HOST_DEVICE
#define DIVCO_INLINE inline
#endif

namespace divco {
namespace math {

DIVCO_INLINE float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

DIVCO_INLINE uint32_t bits_from_float(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

DIVCO_INLINE bool is_nan(float x) { return x != x; }

DIVCO_INLINE float positive_infinity() { return float_from_bits(0x7f800000u); }
DIVCO_INLINE float quiet_nan() { return float_from_bits(0x7fc00000u); }

// max that propagates NaN from either side (std::max and fmaxf drop it).
// (Bitwise | rather than ||: no branch, so compilers vectorise loops that use it.)
DIVCO_INLINE float max_nan(float a, float b) { return (is_nan(a) | (a > b)) ? a : b; }

// exp(x) for float32. On the GPU the CUDA library's expf. On the CPU a branch-free
// Cephes-style polynomial (about 1 ulp) that GCC/Clang vectorise inside loops; glibc's
// expf is a call the compiler cannot vectorise without -ffast-math, and -ffast-math
// would break NaN propagation.
DIVCO_INLINE float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float kMaxArg = 88.3762626647949f;   // 2^127.5: the result stays finite
  const float kMinArg = -87.3365447504019f;  // 2^-126: smallest normal float
  const float kRoundMagic = 12582912.0f;     // 1.5 * 2^23: adding it rounds to an integer
  const float clamped = x > kMaxArg ? kMaxArg : (x < kMinArg ? kMinArg : x);  // NaN stays NaN
  // x = n ln2 + r, |r| <= ln2 / 2; ln2 split in two so n * ln2_hi is exact.
  const float shifted = clamped * 1.44269504088896341f + kRoundMagic;
  const float n = shifted - kRoundMagic;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * (r * r) + r + 1.0f;
  // 2^n: the low mantissa bits of `shifted` hold n (two's complement), so shifting them into
  // the exponent field and adding the bias gives the float 2^n for -126 <= n <= 127.
  const float two_to_n = float_from_bits((bits_from_float(shifted) << 23) + 0x3f800000u);
  const float result = exp_r * two_to_n;
  return x < kMinArg ? 0.0f : (x > kMaxArg ? positive_infinity() : result);
#endif
}

// log(x) for float32. GPU: logf. CPU: branch-free Cephes-style polynomial (about 1 ulp),
// exact special cases: log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, NaN -> NaN;
// subnormal inputs are rescaled first.
DIVCO_INLINE float log_f32(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  const bool subnormal = x < 1.17549435e-38f;  // also true for 0 and negatives (handled below)
  const float scaled = subnormal ? x * 8388608.0f : x;  // * 2^23
  const uint32_t bits = bits_from_float(scaled);
  // scaled = m * 2^e with m in [0.5, 1)
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xffu) - 126) - (subnormal ? 23.0f : 0.0f);
  float m = float_from_bits((bits & 0x007fffffu) | 0x3f000000u);
  // Move m to [sqrt(1/2), sqrt(2)) - 1 so the polynomial sees |m| <= 0.414.
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float m2 = m * m;
  float poly = 7.0376836292e-2f;
  poly = poly * m - 1.1514610310e-1f;
  poly = poly * m + 1.1676998740e-1f;
  poly = poly * m - 1.2420140846e-1f;
  poly = poly * m + 1.4249322787e-1f;
  poly = poly * m - 1.6668057665e-1f;
  poly = poly * m + 2.0000714765e-1f;
  poly = poly * m - 2.4999993993e-1f;
  poly = poly * m + 3.3333331174e-1f;
  float y = poly * m * m2;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * m2;
  float result = m + y + e * 0.693359375f;
  result = x == positive_infinity() ? x : result;
  result = x == 0.0f ? -positive_infinity() : result;
  return (x < 0.0f || is_nan(x)) ? quiet_nan() : result;
#endif
}

// torch.argmax order: NaN counts as the largest value; among equals the lower index wins.
DIVCO_INLINE bool argmax_prefers(float value, int64_t index, float best, int64_t best_index) {
  if (is_nan(value)) return !is_nan(best) || index < best_index;
  if (is_nan(best)) return false;
  return value > best || (value == best && index < best_index);
}

// Softmax statistics of a set of values x (an online softmax over tiles of K):
// max of x and sum of exp((x - max) * scale). `scale` is 1/T for p and 1 for q.
// An empty set is {-inf, 0}.
struct SoftmaxStats {
  float max;
  float sum;
};

DIVCO_INLINE SoftmaxStats softmax_stats_empty() { return {-positive_infinity(), 0.0f}; }

// Rescale factor of a partial sum taken relative to `old_max` when the max becomes
// `new_max` (>= old_max). An empty partial (old_max = -inf) contributes nothing.
DIVCO_INLINE float softmax_rescale(float old_max, float new_max, float scale) {
  return old_max == -positive_infinity() ? 0.0f : exp_f32((old_max - new_max) * scale);
}

// Adds one value to running statistics (one exp per value).
DIVCO_INLINE SoftmaxStats softmax_stats_add(SoftmaxStats stats, float x, float scale) {
  if (x == -positive_infinity()) return stats;  // exp(-inf) = 0; avoids -inf - -inf
  if (x > stats.max || is_nan(x)) {
    return {x, stats.sum * softmax_rescale(stats.max, x, scale) + 1.0f};
  }
  if (is_nan(stats.max)) return stats;
  return {stats.max, stats.sum + exp_f32((x - stats.max) * scale)};
}

// Merges two partial statistics (the combine step of the online softmax).
DIVCO_INLINE SoftmaxStats softmax_stats_merge(SoftmaxStats a, SoftmaxStats b, float scale) {
  const float m = max_nan(a.max, b.max);
  if (is_nan(m)) return {m, m};
  if (m == -positive_infinity()) return softmax_stats_empty();
  return {m, a.sum * softmax_rescale(a.max, m, scale) + b.sum * softmax_rescale(b.max, m, scale)};
}

// log of the softmax normaliser: log sum_k exp(x_k * scale) = max * scale + log(sum).
DIVCO_INLINE float softmax_log_normalizer(float max, float sum, float scale) {
  return max * scale + log_f32(sum);
}

// ---- co-training term ---------------------------------------------------------------
// js: J_n = (1/S) sum_s KL(p_s || pbar); kl: J_n = S/(S-1) sum_s sum_k (p_sk - pbar_k) log p_sk,
// which equals 1/(S-1) sum_s sum_{t != s} KL(p_t || p_s).

// One element of KL(p_s || pbar): p log(p / pbar), 0 where p == 0 (the limit; pbar may be 0
// there too, when every branch's probability underflows).
DIVCO_INLINE float js_kl_element(float p, float log_p, float log_pbar) {
  return p == 0.0f ? 0.0f : p * (log_p - log_pbar);
}

// dJ_n/du_sk for js: (1/S) p [(log p - log pbar) - KL(p_s || pbar)].
DIVCO_INLINE float js_grad_element(float p, float log_p, float log_pbar, float kl_s, float inv_branches) {
  return p == 0.0f ? 0.0f : inv_branches * p * ((log_p - log_pbar) - kl_s);
}

// Masked classes (semantics version 2): a class with log p_sk = -inf (a -inf logit, or a
// logit so far below the max that z - max overflows to -inf in float32) has probability
// exactly 0 and contributes 0 to every entropy and KL term (p log p := 0 at p = 0, and the
// p_t log p_s terms of the KLs into branch s are dropped there), with gradient 0.
DIVCO_INLINE bool is_masked(float log_p) { return log_p == -positive_infinity(); }

// One element of the kl value: (p_sk - pbar_k) log p_sk; exactly 0 where p == pbar (a class
// that every branch gives probability 0) and where the class is masked in branch s.
DIVCO_INLINE float kl_value_element(float p, float pbar, float log_p) {
  return ((p == pbar) | is_masked(log_p)) ? 0.0f : (p - pbar) * log_p;
}

// pbar_k where class k is masked in branch s, else 0: summed over k it is the branch's
// masked mass m_s (exactly 0 when nothing is masked), which the kl gradient needs.
DIVCO_INLINE float kl_masked_mass_element(float pbar, float log_p) { return is_masked(log_p) ? pbar : 0.0f; }

// dJ_n/du_sk for kl: S/(S-1) (p (1 - m_s) - pbar), 0 where masked; `factor` = S / (S - 1).
// The gradient of J with the masked terms dropped (= S/(S-1) (p - pbar) when m_s = 0: then
// p - p * 0 is p exactly, the same bits as without masking).
DIVCO_INLINE float kl_grad_element(float p, float pbar, float log_p, float masked_mass, float factor) {
  return is_masked(log_p) ? 0.0f : factor * ((p - p * masked_mass) - pbar);
}

// The same where m_s = 0 (the same bits: a class masked in branch s then has pbar = p = 0).
DIVCO_INLINE float kl_grad_element_unmasked(float p, float pbar, float factor) { return factor * (p - pbar); }

// ---- cross-entropy --------------------------------------------------------------------

// dCE_s/dz_sk per row (before 1/N): (sum_k y_k) q_k - y_k.
DIVCO_INLINE float ce_grad_element(float q, float target, float target_sum) { return target_sum * q - target; }

// ---- per-sample weights ----------------------------------------------------------------

// v_n, the weight of row n: scales the row's CE_s and J_n (before the batch mean) and its
// gradient (inv_rows and cot_scale of loss_grad_element). 1 without weights: multiplying by
// 1 keeps every bit, so the unweighted results are those of the kernels before weights.
DIVCO_INLINE float row_weight(const float* sample_weight, int64_t stride, int64_t n) {
  return sample_weight == nullptr ? 1.0f : sample_weight[n * stride];
}

// The whole per-element gradient of the loss, as every kernel writes it:
// (1/N) dCE + w (1/N) (1/T) dJ; `cot_scale` = w / (N T).
DIVCO_INLINE float loss_grad_element(float ce_grad, float cot_grad, float inv_rows, float cot_scale) {
  return ce_grad * inv_rows + cot_scale * cot_grad;
}

// ---- ensembles --------------------------------------------------------------------------

// The mean of S logits of one class is accumulated in double and rounded once: it never
// overflows when the mean fits in float32 (logits near +-3e38), and it is the float32
// rounding of the exact mean (up to double rounding), the same bits on CPU and GPU. Add with
// mean_logit_add, finish with mean_logit_finish(sum, LogitsView::inv_branches): a multiply,
// not a division (a double division is a subroutine call on GPUs, which made ptxas spill).
DIVCO_INLINE double mean_logit_add(double sum, float z) { return sum + static_cast<double>(z); }
DIVCO_INLINE float mean_logit_finish(double sum, double inv_branches) { return static_cast<float>(sum * inv_branches); }

// mean_probs: dL/dz_sk = (1/S) p_sk (g_k - <g, p_s>); geo_mean uses the same with the
// ensemble's own probabilities e in place of p_s (softmax(mean_s log_softmax z_s) equals
// softmax(mean_s z_s)); max_probs uses it with weight 1 and g_k kept only for the classes
// where branch s is the first maximal branch (0 elsewhere).
DIVCO_INLINE float softmax_backward_element(float p, float g, float g_dot_p, float inv_branches) {
  return inv_branches * p * (g - g_dot_p);
}

// ---- weighted ensembles ---------------------------------------------------------------
// Per-branch weights w [S] arrive normalised (op_common.cpp: w / w.sum(), on the device).
// A branch of weight 0 takes no part: it adds exactly 0 (also where its logits are +-inf or
// NaN, where 0 * x would be NaN) and gets gradient 0.
// w * x, exactly 0 where w == 0 (whatever x is).
DIVCO_INLINE float weighted_term(float w, float x) { return w == 0.0f ? 0.0f : w * x; }

// One term of the weighted mean of logits Σ_s w_s z_s, accumulated in float: with weights
// summing to 1 no partial sum exceeds max_s |z_s|, so it cannot overflow (the unweighted mean
// needs its double accumulator because it sums before it divides; a double here made the CUDA
// geo_mean backward spill registers).
DIVCO_INLINE float weighted_logit_add(float sum, float w, float z) { return w == 0.0f ? sum : sum + w * z; }

// One term y_k · z_k of a soft target's dot product, with 0 · (-inf) := 0: a class the
// target gives no mass adds nothing, even where its logit is masked (-inf).
DIVCO_INLINE float soft_target_term(float y, float z) { return y == 0.0f ? 0.0f : y * z; }

}  // namespace math
}  // namespace divco
