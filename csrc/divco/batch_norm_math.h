// Per-channel math of the fused BatchNorm (divco::batch_norm_native), shared by the C++ CPU
// kernels and the CUDA kernels so that both compute the same float32 operations in the
// same order (the Triton kernels in kernels/batch_norm.py spell the same formulas).
//
//   forward   out = act((x - mean)·scale + b (+ residual)),  scale = w / sqrt(var + eps);
//             centred first, so |x| ~ 1e18 keeps its digits (x·scale - mean·scale would cancel);
//             act = ReLU keeps NaN (y < 0 ? 0 : y), like torch.relu
//   backward  dy' = dy·[out > 0] (ReLU) and, over the channel's M = N·H·W values,
//             grad_bias = Σdy',  grad_weight = Σdy'·x̂,  x̂ = (x - mean)/sqrt(var + eps)
//             dx = k·dy' + b·(x - mean) + c  with k = w·invstd and, in training,
//             b = -k·invstd·Σdy'x̂/M, c = -k·Σdy'/M (eval: b = c = 0)
// Batch statistics: each tile of a channel (a row, a chunk of positions) sums x - p for its own
// pivot p (its first value; the float32 differences of values that close are exact or nearly),
// in double, into Moments (count, mean, M2); tiles merge with Chan's parallel formula, in a
// fixed order (mean and biased variance M2/M in float32 at the end).
//   running   r = (1 - f)·r + f·s (mean: s = batch mean; var: s = unbiased batch variance),
//             f = momentum, or 1 / num_batches_tracked for the cumulative average (momentum=None)
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DIVCO_BN_HD __host__ __device__ __forceinline__
#else
#define DIVCO_BN_HD inline
#endif

namespace divco {
namespace math {

struct BatchNormStats {
  float mean;
  float var;  // biased
};

// count values with this mean and Σ(x - mean)² = m2.
struct Moments {
  double count;
  double mean;
  double m2;
};

// The moments of `count` values from their sums shifted by `pivot`: Σ(x-p), Σ(x-p)².
DIVCO_BN_HD Moments moments_from_shifted_sums(float pivot, double shifted_sum, double shifted_sum_sq, double count) {
  if (count <= 0.0) return {0.0, 0.0, 0.0};
  const double shift = shifted_sum / count;
  const double m2 = shifted_sum_sq - shifted_sum * shift;
  return {count, static_cast<double>(pivot) + shift, m2 > 0.0 ? m2 : 0.0};
}

// Chan et al.'s parallel formula: the moments of the union of two disjoint sets.
DIVCO_BN_HD Moments merge_moments(Moments a, Moments b) {
  const double count = a.count + b.count;
  if (b.count <= 0.0) return a;
  if (a.count <= 0.0) return b;
  const double delta = b.mean - a.mean;
  const double wb = b.count / count;
  return {count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

DIVCO_BN_HD BatchNormStats batch_norm_stats(Moments m) {
  const double var = m.count > 0.0 ? m.m2 / m.count : 0.0;
  return {static_cast<float>(m.mean), static_cast<float>(var > 0.0 ? var : 0.0)};
}

// One running statistic: (1 - factor)·running + factor·(batch·batch_scale); batch_scale turns
// the biased variance into the unbiased one (M / (M - 1)), 1 for the mean.
DIVCO_BN_HD float running_update(float running, float batch, float factor, float batch_scale) {
  return (1.0f - factor) * running + factor * (batch * batch_scale);
}

// momentum, or 1 / num_batches_tracked for the cumulative average (num_batches_tracked counts
// this batch too, so it is >= 1 whenever the update runs).
DIVCO_BN_HD float running_factor(bool cumulative, float momentum, long long num_batches_tracked) {
  if (!cumulative) return momentum;
  return num_batches_tracked > 0 ? static_cast<float>(1.0 / static_cast<double>(num_batches_tracked)) : 1.0f;
}

DIVCO_BN_HD float batch_norm_invstd(float var, float eps) { return 1.0f / std::sqrt(var + eps); }

struct BatchNormAffine {
  float mean;
  float scale;
  float bias;
};

// weight / bias: nullptr when the BatchNorm has none (weight 1, bias 0).
DIVCO_BN_HD BatchNormAffine batch_norm_affine(float mean, float var, float eps, const float* weight, const float* bias,
                                              long long c) {
  float scale = batch_norm_invstd(var, eps);
  if (weight != nullptr) scale = scale * weight[c];
  return {mean, scale, bias != nullptr ? bias[c] : 0.0f};
}

DIVCO_BN_HD float relu_keep_nan(float y) { return y < 0.0f ? 0.0f : y; }

// residual: 0 when there is none (adding +0.0f leaves every value, -0 aside, unchanged).
DIVCO_BN_HD float batch_norm_forward_value(float x, BatchNormAffine a, float residual, bool relu) {
  const float y = (x - a.mean) * a.scale + a.bias + residual;
  return relu ? relu_keep_nan(y) : y;
}

// The gradient through the ReLU: the mask is recomputed from the saved output.
DIVCO_BN_HD float relu_masked_grad(float grad, float out, bool relu) { return (!relu || out > 0.0f) ? grad : 0.0f; }

struct BatchNormBackward {
  float k;  // d out / d x for fixed statistics: w·invstd
  float b;  // coefficient of (x - mean), from the statistics' dependence on x
  float c;  // constant term
};

// sum_dy = Σdy', sum_dy_centered = Σdy'·(x - mean) over the channel's `count` values.
DIVCO_BN_HD BatchNormBackward batch_norm_backward_coefficients(float var, float eps, const float* weight, long long c,
                                                              float sum_dy, float sum_dy_xhat, float count,
                                                              bool training) {
  const float invstd = batch_norm_invstd(var, eps);
  const float k = weight != nullptr ? invstd * weight[c] : invstd;
  if (!training) return {k, 0.0f, 0.0f};
  return {k, -k * invstd * sum_dy_xhat / count, -k * sum_dy / count};
}

DIVCO_BN_HD float batch_norm_backward_value(float grad, float x, float mean, BatchNormBackward co) {
  return co.k * grad + co.b * (x - mean) + co.c;
}

}  // namespace math
}  // namespace divco
