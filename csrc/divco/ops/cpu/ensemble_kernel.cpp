// CPU kernels of divco::ensemble_native and divco::ensemble_backward_native: rows in
// parallel, each row converted once to float32, vectorised loops (row_loops.h). Host checks:
// ../op_common.cpp; registered for the CPU dispatch key at the end.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../../cotrain_math.h"
#include "../dtype_dispatch.h"
#include "../op_common.h"
#include "row_loops.h"

namespace divco {
namespace ops {
namespace cpu {
namespace {

using math::exp_f32;

// softmax of x[0..K) into out; `out` may be `x` (elementwise in place).
DIVCO_CPU_INLINE void softmax_row(const float* x, int64_t K, float* out) {
  const float m = lane_max(x, K);
  for (int64_t k = 0; k < K; ++k) out[k] = exp_f32(x[k] - m);
  const float inv_sum = 1.0f / lane_sum(K, [&](int64_t k) { return out[k]; });
  for (int64_t k = 0; k < K; ++k) out[k] = out[k] * inv_sum;
}

// Per-thread buffers of the ensemble kernels for one row.
struct EnsembleWorkspace {
  std::vector<float> storage;
  std::vector<double> sum;           // [K] mean_over_branches' accumulator
  std::vector<int32_t> best_branch;  // [K] max_probs backward: the branch holding the max
  std::vector<float> weight;         // [S] normalised weights (empty: equal weights)
  float* z;                          // [S, K] logits as float (max_probs: their softmax)
  float* scratch;                    // [K]
  float* out;                        // [K]

  EnsembleWorkspace(int64_t S, int64_t K, const float* weights)
      : storage(static_cast<size_t>((S + 2) * K)), sum(static_cast<size_t>(K)), best_branch(static_cast<size_t>(K)) {
    z = storage.data();
    scratch = z + S * K;
    out = scratch + K;
    if (weights != nullptr) {
      weight.assign(weights, weights + S);  // normalised by prepare_ensemble
    }
  }
  bool weighted() const { return !weight.empty(); }
};

// Σ_s w_s z_s over branches into out (math::weighted_logit_add; a branch of weight 0 adds nothing).
DIVCO_CPU_INLINE void weighted_mean_over_branches(const float* z, const float* w, int64_t S, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t k = 0; k < K; ++k) out[k] = math::weighted_logit_add(out[k], w[s], z[s * K + k]);
  }
}

// The top-1 class of one branch's logits x[0..K) (torch.argmax: NaN first, then the first max).
DIVCO_CPU_INLINE int64_t row_argmax(const float* x, int64_t K) {
  int64_t best = 0;
  for (int64_t k = 1; k < K; ++k) {
    if (math::argmax_prefers(x[k], k, x[best], best)) best = k;
  }
  return best;
}

// mean over branches of the logits (branch order fixed; double accumulator, see
// math::mean_logit_add).
DIVCO_CPU_INLINE void mean_over_branches(const float* z, int64_t S, int64_t K, double* sum, float* out) {
  const double inv_branches = 1.0 / static_cast<double>(S);  // as LogitsView::inv_branches
  for (int64_t k = 0; k < K; ++k) sum[k] = static_cast<double>(z[k]);
  for (int64_t s = 1; s < S; ++s) {
    for (int64_t k = 0; k < K; ++k) sum[k] = math::mean_logit_add(sum[k], z[s * K + k]);
  }
  for (int64_t k = 0; k < K; ++k) out[k] = math::mean_logit_finish(sum[k], inv_branches);
}

// Every branch's softmax, in place: z [S, K] becomes p [S, K].
DIVCO_CPU_INLINE void softmax_branches(float* z, int64_t S, int64_t K) {
  for (int64_t s = 0; s < S; ++s) softmax_row(z + s * K, K, z + s * K);
}

// out[k] = max_s x[s, k] (NaN wins).
DIVCO_CPU_INLINE void max_over_branches(const float* x, int64_t S, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = x[k];
  for (int64_t s = 1; s < S; ++s) {
    for (int64_t k = 0; k < K; ++k) out[k] = math::max_nan(out[k], x[s * K + k]);
  }
}

// best[k] = the first branch holding NaN at class k, else the first maximal one (torch.max).
DIVCO_CPU_INLINE void argmax_over_branches(const float* x, int64_t S, int64_t K, int32_t* best) {
  for (int64_t k = 0; k < K; ++k) {
    int64_t b = 0;
    for (int64_t s = 1; s < S; ++s) {
      if (math::argmax_prefers(x[s * K + k], s, x[b * K + k], b)) b = s;
    }
    best[k] = static_cast<int32_t>(b);
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void load_branches(const LogitsView& v, int64_t n, float* z) {
  const auto* logits = static_cast<const scalar_t*>(v.data) + n * v.stride_row;
  for (int64_t s = 0; s < v.branches; ++s) load_row(logits + s * v.stride_branch, v.stride_class, v.classes, z + s * v.classes);
}

// The (weighted) mean of the logits over branches into out.
DIVCO_CPU_INLINE void branch_mean(const EnsembleWorkspace& w, int64_t S, int64_t K, double* sum, float* out) {
  if (w.weighted()) {
    weighted_mean_over_branches(w.z, w.weight.data(), S, K, out);
  } else {
    mean_over_branches(w.z, S, K, sum, out);
  }
}

// Forward: row n of the ensemble into w.out (float), from w.z [S, K].
DIVCO_CPU_INLINE void ensemble_row(EnsembleMode mode, int64_t S, int64_t K, EnsembleWorkspace& w) {
  switch (mode) {
    case EnsembleMode::kMeanLogits:
      branch_mean(w, S, K, w.sum.data(), w.out);
      break;
    case EnsembleMode::kMeanProbs: {
      float* out = w.out;
      for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        if (w.weighted()) {
          const float ws = w.weight[s];
          if (ws == 0.0f) continue;  // no part in the ensemble (its logits may be NaN)
          softmax_row(w.z + s * K, K, w.scratch);
          for (int64_t k = 0; k < K; ++k) out[k] += ws * w.scratch[k];
        } else {
          softmax_row(w.z + s * K, K, w.scratch);
          for (int64_t k = 0; k < K; ++k) out[k] += w.scratch[k];
        }
      }
      if (!w.weighted()) {
        const float branches = static_cast<float>(S);
        for (int64_t k = 0; k < K; ++k) out[k] = out[k] / branches;
      }
      break;
    }
    case EnsembleMode::kGeoMean:
      // softmax(Σ_s w_s log_softmax(z_s)) = softmax(Σ_s w_s z_s): the log-normalisers only
      // shift every class by the same amount.
      branch_mean(w, S, K, w.sum.data(), w.scratch);
      softmax_row(w.scratch, K, w.out);
      break;
    case EnsembleMode::kVote: {
      // out_k = Σ_s w_s [top1_s = k]; unweighted: the count of votes / S (one rounding).
      float* out = w.out;
      for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
      for (int64_t s = 0; s < S; ++s) out[row_argmax(w.z + s * K, K)] += w.weighted() ? w.weight[s] : 1.0f;
      if (!w.weighted()) {
        const float branches = static_cast<float>(S);
        for (int64_t k = 0; k < K; ++k) out[k] = out[k] / branches;
      }
      break;
    }
    case EnsembleMode::kMax:
      max_over_branches(w.z, S, K, w.out);
      break;
    case EnsembleMode::kMaxProbs:
      softmax_branches(w.z, S, K);
      max_over_branches(w.z, S, K, w.out);
      break;
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void ensemble_rows(const EnsembleArgs& a, int64_t begin, int64_t end) {
  const int64_t S = a.logits.branches, K = a.logits.classes;
  EnsembleWorkspace w(S, K, a.weights);
  for (int64_t n = begin; n < end; ++n) {
    load_branches<scalar_t>(a.logits, n, w.z);
    ensemble_row(a.mode, S, K, w);
    auto* dst = static_cast<scalar_t*>(a.out) + n * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = from_float<scalar_t>(w.out[k]);
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void ensemble_backward_rows(const EnsembleBackwardArgs& a, int64_t begin, int64_t end) {
  const int64_t S = a.logits.branches, K = a.logits.classes;
  EnsembleWorkspace w(S, K, a.weights);
  const float* weight = w.weighted() ? w.weight.data() : nullptr;
  float* z = w.z;
  float* g = w.out;
  float* p = w.scratch;
  const float inv_branches = 1.0f / static_cast<float>(S);
  for (int64_t n = begin; n < end; ++n) {
    load_branches<scalar_t>(a.logits, n, z);
    load_row(static_cast<const scalar_t*>(a.grad_out) + n * a.grad_out_stride_row, a.grad_out_stride_class, K, g);
    auto* dst = static_cast<scalar_t*>(a.grad_logits) + n * S * K;
    switch (a.mode) {
      case EnsembleMode::kMeanLogits: {
        const float branches = static_cast<float>(S);
        for (int64_t s = 0; s < S; ++s) {
          if (weight != nullptr) {
            for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(math::weighted_term(weight[s], g[k]));
          } else {
            for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(g[k] / branches);
          }
        }
        break;
      }
      case EnsembleMode::kVote:  // piecewise constant
        for (int64_t i = 0; i < S * K; ++i) dst[i] = from_float<scalar_t>(0.0f);
        break;
      case EnsembleMode::kMeanProbs:
        for (int64_t s = 0; s < S; ++s) {
          if (weight != nullptr && weight[s] == 0.0f) {  // no part, no gradient (its logits may be NaN)
            for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(0.0f);
            continue;
          }
          const float factor = weight != nullptr ? weight[s] : inv_branches;
          softmax_row(z + s * K, K, p);
          const float g_dot_p = lane_sum(K, [&](int64_t k) { return g[k] * p[k]; });
          for (int64_t k = 0; k < K; ++k)
            dst[s * K + k] = from_float<scalar_t>(math::softmax_backward_element(p[k], g[k], g_dot_p, factor));
        }
        break;
      case EnsembleMode::kGeoMean: {
        float* mean = z;  // z is no longer needed after the mean: reuse its first plane
        branch_mean(w, S, K, w.sum.data(), p);
        softmax_row(p, K, mean);
        const float g_dot_e = lane_sum(K, [&](int64_t k) { return g[k] * mean[k]; });
        if (weight != nullptr) {
          // dL/dz_sk = w_s e_k (g_k - <g, e>)
          for (int64_t k = 0; k < K; ++k) p[k] = math::softmax_backward_element(mean[k], g[k], g_dot_e, 1.0f);
          for (int64_t s = 0; s < S; ++s) {
            for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(math::weighted_term(weight[s], p[k]));
          }
          break;
        }
        for (int64_t k = 0; k < K; ++k) p[k] = math::softmax_backward_element(mean[k], g[k], g_dot_e, inv_branches);
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(p[k]);
        }
        break;
      }
      case EnsembleMode::kMax: {
        int32_t* best = w.best_branch.data();
        argmax_over_branches(z, S, K, best);
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t k = 0; k < K; ++k) dst[s * K + k] = from_float<scalar_t>(best[k] == s ? g[k] : 0.0f);
        }
        break;
      }
      case EnsembleMode::kMaxProbs: {
        // out_k = p_{b(k), k}: branch s gets the softmax backward of the g_k it holds the max of.
        int32_t* best = w.best_branch.data();
        softmax_branches(z, S, K);
        argmax_over_branches(z, S, K, best);
        for (int64_t s = 0; s < S; ++s) {
          const float* ps = z + s * K;
          const float g_dot_p = lane_sum(K, [&](int64_t k) { return best[k] == s ? g[k] * ps[k] : 0.0f; });
          for (int64_t k = 0; k < K; ++k) {
            const float held = best[k] == s ? g[k] : 0.0f;
            dst[s * K + k] = from_float<scalar_t>(math::softmax_backward_element(ps[k], held, g_dot_p, 1.0f));
          }
        }
        break;
      }
    }
  }
}

DIVCO_CPU_CLONED_ROWS(ensemble_rows_cloned, EnsembleArgs, ensemble_rows)
DIVCO_CPU_CLONED_ROWS(ensemble_backward_rows_cloned, EnsembleBackwardArgs, ensemble_backward_rows)

}  // namespace

void run_ensemble(const EnsembleArgs& a) {
  const int64_t grain = row_grain_size(a.logits.branches, a.logits.classes);
  dispatch_logits_dtype(a.logits.dtype, [&](auto dtype) {
    at::parallel_for(0, a.logits.rows, grain, [&](int64_t begin, int64_t end) { ensemble_rows_cloned(a, begin, end, dtype); });
  });
}

void run_ensemble_backward(const EnsembleBackwardArgs& a) {
  const int64_t grain = row_grain_size(a.logits.branches, a.logits.classes);
  dispatch_logits_dtype(a.logits.dtype, [&](auto dtype) {
    at::parallel_for(0, a.logits.rows, grain,
                     [&](int64_t begin, int64_t end) { ensemble_backward_rows_cloned(a, begin, end, dtype); });
  });
}

}  // namespace cpu

namespace {

at::Tensor ensemble_cpu(const at::Tensor& logits, std::string_view mode, const std::optional<at::Tensor>& weights) {
  EnsembleCall call = prepare_ensemble(logits, mode, weights, c10::DeviceType::CPU);
  cpu::run_ensemble(call.args);
  return call.out;
}

at::Tensor ensemble_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits, std::string_view mode,
                                 const std::optional<at::Tensor>& weights) {
  EnsembleBackwardCall call = prepare_ensemble_backward(grad_out, logits, mode, weights, c10::DeviceType::CPU);
  cpu::run_ensemble_backward(call.args);
  return call.grad_logits;
}

}  // namespace

}  // namespace ops
}  // namespace divco

TORCH_LIBRARY_IMPL(divco, CPU, m) {
  m.impl("ensemble_native", &divco::ops::ensemble_cpu);
  m.impl("ensemble_backward_native", &divco::ops::ensemble_backward_cpu);
}
