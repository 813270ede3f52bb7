// CPU kernels of divco::ensemble_native and divco::ensemble_backward_native: rows in
// parallel, each row converted once to float32, vectorised loops (row_loops.h).
#include <ATen/Parallel.h>

#include <vector>

#include "../../cotrain_math.h"
#include "../op_common.h"
#include "../ops.h"
#include "row_loops.h"

namespace divco {
namespace ops {
namespace cpu {
namespace {

using math::exp_f32;

// softmax of x[0..K) into out; `out` may alias nothing else.
DIVCO_CPU_INLINE void softmax_row(const float* x, int64_t K, float* out) {
  const float m = lane_max(x, K);
  for (int64_t k = 0; k < K; ++k) out[k] = exp_f32(x[k] - m);
  const float inv_sum = 1.0f / lane_sum(K, [&](int64_t k) { return out[k]; });
  for (int64_t k = 0; k < K; ++k) out[k] = out[k] * inv_sum;
}

// mean over branches of the logits (branch order fixed).
DIVCO_CPU_INLINE void mean_over_branches(const float* z, int64_t S, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = z[k];
  for (int64_t s = 1; s < S; ++s) {
    for (int64_t k = 0; k < K; ++k) out[k] += z[s * K + k];
  }
  const float branches = static_cast<float>(S);
  for (int64_t k = 0; k < K; ++k) out[k] = out[k] / branches;
}

template <typename scalar_t>
DIVCO_CPU_INLINE void load_branches(const LogitsView& v, int64_t n, float* z) {
  const auto* logits = static_cast<const scalar_t*>(v.data) + n * v.stride_row;
  for (int64_t s = 0; s < v.branches; ++s) load_row(logits + s * v.stride_branch, v.stride_class, v.classes, z + s * v.classes);
}

// Forward: row n of the ensemble into out (float), from z [S, K]; `p` is [K] scratch.
DIVCO_CPU_INLINE void ensemble_row(EnsembleMode mode, const float* z, int64_t S, int64_t K, float* p, float* out) {
  switch (mode) {
    case EnsembleMode::kMeanLogits:
      mean_over_branches(z, S, K, out);
      break;
    case EnsembleMode::kMeanProbs: {
      for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        softmax_row(z + s * K, K, p);
        for (int64_t k = 0; k < K; ++k) out[k] += p[k];
      }
      const float branches = static_cast<float>(S);
      for (int64_t k = 0; k < K; ++k) out[k] = out[k] / branches;
      break;
    }
    case EnsembleMode::kGeoMean:
      // softmax(mean_s log_softmax(z_s)) = softmax(mean_s z_s): the log-normalisers only
      // shift every class by the same amount.
      mean_over_branches(z, S, K, p);
      softmax_row(p, K, out);
      break;
    case EnsembleMode::kMax:
      for (int64_t k = 0; k < K; ++k) out[k] = z[k];
      for (int64_t s = 1; s < S; ++s) {
        for (int64_t k = 0; k < K; ++k) out[k] = math::max_nan(out[k], z[s * K + k]);
      }
      break;
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void ensemble_rows(const EnsembleArgs& a, int64_t begin, int64_t end) {
  const int64_t S = a.logits.branches, K = a.logits.classes;
  std::vector<float> buffer(static_cast<size_t>((S + 2) * K));
  float* z = buffer.data();
  float* p = z + S * K;
  float* out = p + K;
  for (int64_t n = begin; n < end; ++n) {
    load_branches<scalar_t>(a.logits, n, z);
    ensemble_row(a.mode, z, S, K, p, out);
    auto* dst = static_cast<scalar_t*>(a.out) + n * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = from_float<scalar_t>(out[k]);
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void ensemble_backward_rows(const EnsembleBackwardArgs& a, int64_t begin, int64_t end) {
  const int64_t S = a.logits.branches, K = a.logits.classes;
  std::vector<float> buffer(static_cast<size_t>((S + 2) * K));
  float* z = buffer.data();
  float* g = z + S * K;
  float* p = g + K;
  const float inv_branches = 1.0f / static_cast<float>(S);
  for (int64_t n = begin; n < end; ++n) {
    load_branches<scalar_t>(a.logits, n, z);
    load_row(static_cast<const scalar_t*>(a.grad_out) + n * a.grad_out_stride_row, a.grad_out_stride_class, K, g);
    auto* dst = static_cast<scalar_t*>(a.grad_logits) + n * S * K;
    switch (a.mode) {
      case EnsembleMode::kMeanLogits: {
        const float branches = static_cast<float>(S);
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(g[k] / branches);
        }
        break;
      }
      case EnsembleMode::kMeanProbs:
        for (int64_t s = 0; s < S; ++s) {
          softmax_row(z + s * K, K, p);
          const float g_dot_p = lane_sum(K, [&](int64_t k) { return g[k] * p[k]; });
          for (int64_t k = 0; k < K; ++k)
            dst[s * K + k] = from_float<scalar_t>(math::softmax_backward_element(p[k], g[k], g_dot_p, inv_branches));
        }
        break;
      case EnsembleMode::kGeoMean: {
        float* mean = z;  // z is no longer needed after the mean: reuse its first plane
        mean_over_branches(z, S, K, p);
        softmax_row(p, K, mean);
        const float g_dot_e = lane_sum(K, [&](int64_t k) { return g[k] * mean[k]; });
        for (int64_t k = 0; k < K; ++k) p[k] = math::softmax_backward_element(mean[k], g[k], g_dot_e, inv_branches);
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(p[k]);
        }
        break;
      }
      case EnsembleMode::kMax: {
        // The gradient goes to the first maximal branch (a NaN counts as maximal), like
        // the indices of torch.max(dim=1).
        const float zero = 0.0f;
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(zero);
        }
        for (int64_t k = 0; k < K; ++k) {
          int64_t best = 0;
          for (int64_t s = 1; s < S; ++s) {
            if (math::argmax_prefers(z[s * K + k], s, z[best * K + k], best)) best = s;
          }
          dst[best * K + k] = from_float<scalar_t>(g[k]);
        }
        break;
      }
    }
  }
}

DIVCO_CPU_TARGET_CLONES void ensemble_rows_f32(const EnsembleArgs& a, int64_t begin, int64_t end) {
  ensemble_rows<float>(a, begin, end);
}
DIVCO_CPU_TARGET_CLONES void ensemble_rows_bf16(const EnsembleArgs& a, int64_t begin, int64_t end) {
  ensemble_rows<c10::BFloat16>(a, begin, end);
}
DIVCO_CPU_TARGET_CLONES void ensemble_rows_f16(const EnsembleArgs& a, int64_t begin, int64_t end) {
  ensemble_rows<c10::Half>(a, begin, end);
}
DIVCO_CPU_TARGET_CLONES void ensemble_backward_rows_f32(const EnsembleBackwardArgs& a, int64_t begin, int64_t end) {
  ensemble_backward_rows<float>(a, begin, end);
}
DIVCO_CPU_TARGET_CLONES void ensemble_backward_rows_bf16(const EnsembleBackwardArgs& a, int64_t begin, int64_t end) {
  ensemble_backward_rows<c10::BFloat16>(a, begin, end);
}
DIVCO_CPU_TARGET_CLONES void ensemble_backward_rows_f16(const EnsembleBackwardArgs& a, int64_t begin, int64_t end) {
  ensemble_backward_rows<c10::Half>(a, begin, end);
}

// Fewest rows worth a thread (as in cotrain_loss_kernel.cpp).
int64_t grain_size(int64_t branches, int64_t classes) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(branches * classes, 1));
}

}  // namespace

void run_ensemble(const EnsembleArgs& a) {
  at::parallel_for(0, a.logits.rows, grain_size(a.logits.branches, a.logits.classes), [&](int64_t begin, int64_t end) {
    switch (a.logits.dtype) {
      case LogitsDtype::kFloat32:
        ensemble_rows_f32(a, begin, end);
        break;
      case LogitsDtype::kBFloat16:
        ensemble_rows_bf16(a, begin, end);
        break;
      case LogitsDtype::kFloat16:
        ensemble_rows_f16(a, begin, end);
        break;
    }
  });
}

void run_ensemble_backward(const EnsembleBackwardArgs& a) {
  at::parallel_for(0, a.logits.rows, grain_size(a.logits.branches, a.logits.classes), [&](int64_t begin, int64_t end) {
    switch (a.logits.dtype) {
      case LogitsDtype::kFloat32:
        ensemble_backward_rows_f32(a, begin, end);
        break;
      case LogitsDtype::kBFloat16:
        ensemble_backward_rows_bf16(a, begin, end);
        break;
      case LogitsDtype::kFloat16:
        ensemble_backward_rows_f16(a, begin, end);
        break;
    }
  });
}

}  // namespace cpu

at::Tensor ensemble_cpu(const at::Tensor& logits, std::string_view mode) {
  EnsembleCall call = prepare_ensemble(logits, mode, c10::DeviceType::CPU);
  cpu::run_ensemble(call.args);
  return call.out;
}

at::Tensor ensemble_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits, std::string_view mode) {
  EnsembleBackwardCall call = prepare_ensemble_backward(grad_out, logits, mode, c10::DeviceType::CPU);
  cpu::run_ensemble_backward(call.args);
  return call.grad_logits;
}

}  // namespace ops
}  // namespace divco
