// Per-channel math of the fused BatchNorm (divco::batch_norm_native), shared by the C++ CPU
// kernels and the CUDA kernels so that both compute the same float32 operations in the
// same order (the Triton kernels in kernels/batch_norm.py spell the same formulas).
//
//   forward   out = act(x·scale + shift (+ residual)),  scale = w / sqrt(var + eps),
//             shift = b - mean·scale;  act = ReLU keeps NaN (y < 0 ? 0 : y), like torch.relu
//   backward  dy' = dy·[out > 0] (ReLU) and, over the channel's M = N·H·W values,
//             grad_bias = Σdy',  grad_weight = Σdy'·x̂,  x̂ = (x - mean)/sqrt(var + eps)
//             dx = k·dy' + b·(x - mean) + c  with k = w·invstd and, in training,
//             b = -k·invstd·Σdy'x̂/M, c = -k·Σdy'/M (eval: b = c = 0)
// Batch statistics come from sums shifted by a pivot p (the channel's first value), kept in
// double: mean = p + Σ(x-p)/M, var = Σ(x-p)²/M - (Σ(x-p)/M)² (biased; float32 results).
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

DIVCO_BN_HD BatchNormStats batch_norm_stats(float pivot, double shifted_sum, double shifted_sum_sq, double count) {
  const double shift = shifted_sum / count;
  const double var = shifted_sum_sq / count - shift * shift;
  return {static_cast<float>(static_cast<double>(pivot) + shift), static_cast<float>(var > 0.0 ? var : 0.0)};
}

DIVCO_BN_HD float batch_norm_invstd(float var, float eps) { return 1.0f / std::sqrt(var + eps); }

struct BatchNormAffine {
  float scale;
  float shift;
};

// weight / bias: nullptr when the BatchNorm has none (weight 1, bias 0).
DIVCO_BN_HD BatchNormAffine batch_norm_affine(float mean, float var, float eps, const float* weight, const float* bias,
                                              long long c) {
  float scale = batch_norm_invstd(var, eps);
  if (weight != nullptr) scale = scale * weight[c];
  float shift = -mean * scale;
  if (bias != nullptr) shift = shift + bias[c];
  return {scale, shift};
}

DIVCO_BN_HD float relu_keep_nan(float y) { return y < 0.0f ? 0.0f : y; }

// residual: 0 when there is none (adding +0.0f leaves every value, -0 aside, unchanged).
DIVCO_BN_HD float batch_norm_forward_value(float x, BatchNormAffine a, float residual, bool relu) {
  const float y = x * a.scale + a.shift + residual;
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
