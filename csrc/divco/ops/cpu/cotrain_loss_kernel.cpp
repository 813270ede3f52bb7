// CPU kernel of divco::cotrain_loss_native: rows in parallel (at::parallel_for), each row
// converted once to float32 in a per-thread workspace, then every output of the row
// computed from that copy with vectorised loops (row_loops.h), in the stages of the Triton
// kernel (kernels/cotrain_loss.py) and the CUDA kernel (cuda/cotrain_loss_kernel.cu):
//   1. softmax statistics   max, top-1, ensemble, softmax sums of z / T and z
//   2. probabilities         pbar = mean_s p_s (log pbar for js)
//   3. co-training partials  cross-entropies, J_n, per-branch KL / masked mass
//   4. gradient write        dloss/dz
// Per-sample weights v_n (math::row_weight) scale row n's cross-entropies, J_n and gradient.
// Per-row partials are reduced afterwards in row order, in double, so the result is
// bit-identical for any thread count. Host checks: ../op_common.cpp; registered for the CPU
// dispatch key at the end.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
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
using math::log_f32;

// Per-thread buffers for one row.
struct RowWorkspace {
  std::vector<float> storage;
  std::vector<double> ensemble_sum;  // [K] sum of the branch logits (double: see mean_logit_add)
  float* z;        // [S, K] logits as float
  float* exp_p;    // [S, K] exp((z - max) / T); p = exp_p / sum
  float* exp_q;    // [S, K] exp(z - max); q = exp_q / sum; aliases exp_p when T == 1
  float* y;        // [K] soft target row
  float* pbar;     // [K] mean_s p (kl) or log of it (js)
  float* ensemble; // [K] mean of the branch logits
  // [S] per branch: max logit, 1 / sum and log sum of exp_p, 1 / sum of exp_q, log sum exp z,
  // KL(p_s || pbar) (js) or the masked mass m_s (kl).
  std::vector<float> max, inv_sum_p, log_sum_p, inv_sum_q, lse_z, branch_cot;

  RowWorkspace(int64_t S, int64_t K, bool separate_q) {
    const int64_t planes = S * (separate_q ? 3 : 2) + 3;
    storage.resize(static_cast<size_t>(planes * K));
    ensemble_sum.resize(static_cast<size_t>(K));
    z = storage.data();
    exp_p = z + S * K;
    exp_q = separate_q ? exp_p + S * K : exp_p;
    y = exp_q + S * K;
    pbar = y + K;
    ensemble = pbar + K;
    for (auto* v : {&max, &inv_sum_p, &log_sum_p, &inv_sum_q, &lse_z, &branch_cot}) {
      v->assign(static_cast<size_t>(S), 0.0f);
    }
  }
};

// The target of one row: a class index (-1 when out of range: a NaN row), or a soft row
// (copied to the workspace) and its top-1.
struct RowTarget {
  int64_t label = -1;  // the class a prediction must hit
  bool valid = true;
  bool soft = false;
  float sum = 1.0f;  // sum_k y_k
};

RowTarget load_target(const CotrainArgs& a, int64_t n, int64_t K, float* y) {
  RowTarget t;
  t.soft = a.target_index == nullptr;
  if (!t.soft) {
    const int64_t index = a.target_index[n * a.target_index_stride];
    t.valid = index >= 0 && index < K;
    t.label = t.valid ? index : -1;
  } else {
    const float* y_src = a.target_soft + n * a.target_soft_stride_row;
    for (int64_t k = 0; k < K; ++k) y[k] = y_src[k * a.target_soft_stride_class];
    t.sum = lane_sum(K, [&](int64_t k) { return y[k]; });
    t.label = lane_max_argmax(y, K).index;
  }
  return t;
}

// ---- stage 1: softmax statistics (the online softmax of the Triton/CUDA kernels) ----------
// Logits to float, per-branch max and top-1, the ensemble and its top-1, the softmax sums
// of z / T (p, co-training term) and of z (q, cross-entropy).
template <typename scalar_t>
DIVCO_CPU_INLINE void softmax_statistics(const CotrainArgs& a, int64_t n, const RowTarget& target, RowWorkspace& w) {
  const LogitsView& v = a.logits;
  const int64_t S = v.branches, K = v.classes;
  const float inv_t = a.inv_temperature;
  const auto* logits = static_cast<const scalar_t*>(v.data) + n * v.stride_row;
  int32_t* hits = a.row_hits + n * (S + 1);
  for (int64_t s = 0; s < S; ++s) {
    float* z = w.z + s * K;
    load_row(logits + s * v.stride_branch, v.stride_class, K, z);
    const MaxArgMax top = lane_max_argmax(z, K);
    w.max[s] = top.max;
    hits[s] = top.index == target.label ? 1 : 0;
  }

  // Ensemble: mean of the branch logits (branch order fixed), and its top-1.
  double* sum = w.ensemble_sum.data();
  for (int64_t k = 0; k < K; ++k) sum[k] = static_cast<double>(w.z[k]);
  for (int64_t s = 1; s < S; ++s) {
    const float* z = w.z + s * K;
    for (int64_t k = 0; k < K; ++k) sum[k] = math::mean_logit_add(sum[k], z[k]);
  }
  float* e = w.ensemble;
  auto* out = static_cast<scalar_t*>(a.ensemble) + n * K;
  for (int64_t k = 0; k < K; ++k) {
    e[k] = math::mean_logit_finish(sum[k], v.inv_branches);
    out[k] = from_float<scalar_t>(e[k]);
  }
  hits[S] = lane_max_argmax(e, K).index == target.label ? 1 : 0;

  const bool same_q = w.exp_q == w.exp_p;
  for (int64_t s = 0; s < S; ++s) {
    const float* z = w.z + s * K;
    float* exp_p = w.exp_p + s * K;
    const float m = w.max[s];
    const float sum_p = lane_sum(K, [&](int64_t k) {
      const float x = exp_f32((z[k] - m) * inv_t);
      exp_p[k] = x;
      return x;
    });
    w.inv_sum_p[s] = 1.0f / sum_p;
    w.log_sum_p[s] = log_f32(sum_p);
    float sum_q = sum_p;
    if (!same_q) {
      float* exp_q = w.exp_q + s * K;
      sum_q = lane_sum(K, [&](int64_t k) {
        const float x = exp_f32(z[k] - m);
        exp_q[k] = x;
        return x;
      });
    }
    w.inv_sum_q[s] = 1.0f / sum_q;
    w.lse_z[s] = math::softmax_log_normalizer(m, sum_q, 1.0f);
  }
}

// ---- stage 2: probabilities ------------------------------------------------------------
// p_sk = exp_p * inv_sum (the same expression everywhere); pbar = mean_s p_s, kept as
// log pbar_k = log(sum_s p_sk) - log S for js (that sum never underflows to 0 where some
// p_sk is nonzero).
DIVCO_CPU_INLINE void mean_probabilities(const CotrainArgs& a, RowWorkspace& w) {
  const int64_t S = a.logits.branches, K = a.logits.classes;
  float* pbar = w.pbar;
  {
    const float* e = w.exp_p;
    const float inv = w.inv_sum_p[0];
    for (int64_t k = 0; k < K; ++k) pbar[k] = e[k] * inv;
  }
  for (int64_t s = 1; s < S; ++s) {
    const float* e = w.exp_p + s * K;
    const float inv = w.inv_sum_p[s];
    for (int64_t k = 0; k < K; ++k) pbar[k] += e[k] * inv;
  }
  if (a.kind == CotrainKind::kJensenShannon) {
    const float log_branches = std::log(static_cast<float>(S));
    for (int64_t k = 0; k < K; ++k) pbar[k] = log_f32(pbar[k]) - log_branches;
  } else {
    const float inv_branches = 1.0f / static_cast<float>(S);
    for (int64_t k = 0; k < K; ++k) pbar[k] = pbar[k] * inv_branches;
  }
}

// ---- stage 3: cross-entropy and co-training partials ------------------------------------
// Per-row cross-entropy of each branch and the row's co-training term J_n; keeps the
// per-branch KL(p_s || pbar) (js) or masked mass (kl) that the gradient needs.
DIVCO_CPU_INLINE void cross_entropy_partials(const CotrainArgs& a, int64_t n, const RowTarget& target,
                                             float row_weight, RowWorkspace& w) {
  const int64_t S = a.logits.branches, K = a.logits.classes;
  float* row_ce = a.row_ce + n * S;
  for (int64_t s = 0; s < S; ++s) {
    const float* z = w.z + s * K;
    float ce;
    if (!target.soft) {
      ce = target.valid ? w.lse_z[s] - z[target.label] : math::quiet_nan();
    } else {
      const float* y = w.y;
      const float y_dot_z = lane_sum(K, [&](int64_t k) { return math::soft_target_term(y[k], z[k]); });
      ce = target.sum * w.lse_z[s] - y_dot_z;
    }
    row_ce[s] = ce * row_weight;
  }
}

DIVCO_CPU_INLINE float cotrain_partials(const CotrainArgs& a, RowWorkspace& w) {
  const int64_t S = a.logits.branches, K = a.logits.classes;
  const float inv_t = a.inv_temperature;
  const float* pbar = w.pbar;
  // log p_sk = (z_sk - max_s) / T - log sum_s: -inf only for masked classes.
  if (a.kind == CotrainKind::kJensenShannon) {
    float kl_sum = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      const float* z = w.z + s * K;
      const float* e = w.exp_p + s * K;
      const float m = w.max[s], inv = w.inv_sum_p[s], log_sum = w.log_sum_p[s];
      w.branch_cot[s] = lane_sum(K, [&](int64_t k) {
        return math::js_kl_element(e[k] * inv, (z[k] - m) * inv_t - log_sum, pbar[k]);
      });
      kl_sum += w.branch_cot[s];
    }
    return kl_sum * (1.0f / static_cast<float>(S));
  }
  float total = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    const float* z = w.z + s * K;
    const float* e = w.exp_p + s * K;
    const float m = w.max[s], inv = w.inv_sum_p[s], log_sum = w.log_sum_p[s];
    total += lane_sum(K, [&](int64_t k) {
      return math::kl_value_element(e[k] * inv, pbar[k], (z[k] - m) * inv_t - log_sum);
    });
    // The masked mass, 0 unless some class is masked in this branch (a cheap test first: the
    // common rows pay one compare per class, not a second weighted sum).
    const bool any_masked =
        lane_sum(K, [&](int64_t k) { return math::is_masked((z[k] - m) * inv_t - log_sum) ? 1.0f : 0.0f; }) > 0.0f;
    w.branch_cot[s] = any_masked ? lane_sum(K, [&](int64_t k) {
      return math::kl_masked_mass_element(pbar[k], (z[k] - m) * inv_t - log_sum);
    })
                                 : 0.0f;
  }
  return total * (static_cast<float>(S) / static_cast<float>(S - 1));
}

// ---- stage 4: gradient write -------------------------------------------------------------

// What the gradient of one branch of one row needs.
struct GradRow {
  const float *z, *exp_p, *exp_q, *y, *pbar;
  float max, inv_sum_p, inv_sum_q, log_sum_p, branch_cot;
  float inv_t, inv_branches, kl_factor, target_sum, inv_rows, cot_scale;
};

// kPairwiseKLMasked: a branch with masked mass m_s > 0 (else the kl gradient is
// S/(S-1) (p - pbar) everywhere, exactly 0 at masked classes since pbar is 0 there too).
enum class CotGrad { kNone, kJensenShannon, kPairwiseKL, kPairwiseKLMasked };

// g[k] = dloss/dz_sk (grad_output = 1): (1/N) dCE + w/(N T) dJ. One instantiation per case,
// so each loop is branch-free and vectorises.
template <typename grad_t, CotGrad kCot, bool kSoft>
DIVCO_CPU_INLINE void write_grad_branch(const GradRow& r, int64_t K, int64_t target, grad_t* g) {
  auto element = [&](int64_t k, float y) {
    const float p = r.exp_p[k] * r.inv_sum_p;
    const float q = r.exp_q[k] * r.inv_sum_q;
    float cot_grad = 0.0f;
    if constexpr (kCot == CotGrad::kJensenShannon) {
      cot_grad = math::js_grad_element(p, (r.z[k] - r.max) * r.inv_t - r.log_sum_p, r.pbar[k], r.branch_cot,
                                       r.inv_branches);
    } else if constexpr (kCot == CotGrad::kPairwiseKL) {
      cot_grad = math::kl_grad_element_unmasked(p, r.pbar[k], r.kl_factor);
    } else if constexpr (kCot == CotGrad::kPairwiseKLMasked) {
      cot_grad = math::kl_grad_element(p, r.pbar[k], (r.z[k] - r.max) * r.inv_t - r.log_sum_p, r.branch_cot,
                                       r.kl_factor);
    }
    return math::loss_grad_element(math::ce_grad_element(q, y, r.target_sum), cot_grad, r.inv_rows, r.cot_scale);
  };
  if constexpr (kSoft) {
    for (int64_t k = 0; k < K; ++k) g[k] = from_float<grad_t>(element(k, r.y[k]));
  } else {
    for (int64_t k = 0; k < K; ++k) g[k] = from_float<grad_t>(element(k, 0.0f));
    g[target] = from_float<grad_t>(element(target, 1.0f));  // y = one-hot(target)
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void write_gradient(const CotrainArgs& a, int64_t n, const RowTarget& target, float row_weight,
                    const RowWorkspace& w) {
  const int64_t S = a.logits.branches, K = a.logits.classes;
  const float inv_t = a.inv_temperature;
  const float inv_batch = 1.0f / static_cast<float>(a.logits.rows);
  const float inv_rows = inv_batch * row_weight;  // v_n / N
  const float cot_scale = S > 1 ? a.weight[0] * inv_t * inv_batch * row_weight : 0.0f;
  const float kl_factor = S > 1 ? static_cast<float>(S) / static_cast<float>(S - 1) : 0.0f;
  const CotGrad kind = S == 1 ? CotGrad::kNone
                              : (a.kind == CotrainKind::kJensenShannon ? CotGrad::kJensenShannon : CotGrad::kPairwiseKL);
  for (int64_t s = 0; s < S; ++s) {
    const CotGrad cot = kind == CotGrad::kPairwiseKL && w.branch_cot[s] != 0.0f ? CotGrad::kPairwiseKLMasked : kind;
    using grad_t = stored_grad_t<scalar_t>;
    auto* g = static_cast<grad_t*>(a.grad) + (n * S + s) * K;
    if (!target.valid) {
      for (int64_t k = 0; k < K; ++k) g[k] = from_float<grad_t>(math::quiet_nan());
      continue;
    }
    const GradRow r{w.z + s * K,    w.exp_p + s * K, w.exp_q + s * K,  w.y,          w.pbar,
                    w.max[s],       w.inv_sum_p[s],  w.inv_sum_q[s],   w.log_sum_p[s], w.branch_cot[s],
                    inv_t,          1.0f / static_cast<float>(S), kl_factor, target.sum, inv_rows,
                    cot_scale};
    const int64_t label = target.soft ? -1 : target.label;
    switch (cot) {
      case CotGrad::kNone:
        target.soft ? write_grad_branch<grad_t, CotGrad::kNone, true>(r, K, label, g)
                    : write_grad_branch<grad_t, CotGrad::kNone, false>(r, K, label, g);
        break;
      case CotGrad::kJensenShannon:
        target.soft ? write_grad_branch<grad_t, CotGrad::kJensenShannon, true>(r, K, label, g)
                    : write_grad_branch<grad_t, CotGrad::kJensenShannon, false>(r, K, label, g);
        break;
      case CotGrad::kPairwiseKL:
        target.soft ? write_grad_branch<grad_t, CotGrad::kPairwiseKL, true>(r, K, label, g)
                    : write_grad_branch<grad_t, CotGrad::kPairwiseKL, false>(r, K, label, g);
        break;
      case CotGrad::kPairwiseKLMasked:
        target.soft ? write_grad_branch<grad_t, CotGrad::kPairwiseKLMasked, true>(r, K, label, g)
                    : write_grad_branch<grad_t, CotGrad::kPairwiseKLMasked, false>(r, K, label, g);
        break;
    }
  }
}

// One row: the four stages in order.
template <typename scalar_t>
DIVCO_CPU_INLINE void cotrain_row(const CotrainArgs& a, int64_t n, RowWorkspace& w) {
  const RowTarget target = load_target(a, n, a.logits.classes, w.y);
  const float row_weight = math::row_weight(a.sample_weight, a.sample_weight_stride, n);
  softmax_statistics<scalar_t>(a, n, target, w);
  cross_entropy_partials(a, n, target, row_weight, w);
  float cot = 0.0f;
  if (a.logits.branches > 1) {
    mean_probabilities(a, w);
    cot = cotrain_partials(a, w);
  }
  a.row_cot[n] = cot * row_weight;
  if (a.grad != nullptr) write_gradient<scalar_t>(a, n, target, row_weight, w);
}

template <typename scalar_t>
DIVCO_CPU_INLINE void cotrain_rows(const CotrainArgs& a, int64_t begin, int64_t end) {
  RowWorkspace w(a.logits.branches, a.logits.classes, a.inv_temperature != 1.0f);
  for (int64_t n = begin; n < end; ++n) cotrain_row<scalar_t>(a, n, w);
}

DIVCO_CPU_CLONED_ROWS(cotrain_rows_cloned, CotrainArgs, cotrain_rows)

// Fixed-order reduction of the per-row partials (double accumulation).
void finalize(const CotrainArgs& a) {
  const int64_t N = a.logits.rows, S = a.logits.branches;
  double cot = 0.0;
  for (int64_t n = 0; n < N; ++n) cot += a.row_cot[n];
  cot /= static_cast<double>(N);
  double loss = 0.0;
  for (int64_t s = 0; s < S; ++s) {
    double ce = 0.0;
    for (int64_t n = 0; n < N; ++n) ce += a.row_ce[n * S + s];
    ce /= static_cast<double>(N);
    a.ce[s] = static_cast<float>(ce);
    loss += ce;
  }
  for (int64_t j = 0; j <= S; ++j) {
    int64_t hits = 0;
    for (int64_t n = 0; n < N; ++n) hits += a.row_hits[n * (S + 1) + j];
    a.correct[j] = hits;
  }
  a.cot[0] = static_cast<float>(cot);
  a.loss[0] = static_cast<float>(loss + static_cast<double>(a.weight[0]) * cot);
}

}  // namespace

void run_cotrain_loss(const CotrainArgs& a) {
  const int64_t grain = row_grain_size(a.logits.branches, a.logits.classes);
  dispatch_logits_dtype(a.logits.dtype, [&](auto dtype) {
    at::parallel_for(0, a.logits.rows, grain, [&](int64_t begin, int64_t end) { cotrain_rows_cloned(a, begin, end, dtype); });
  });
  finalize(a);
}

}  // namespace cpu

namespace {

CotrainResult cotrain_loss_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                               const std::optional<at::Tensor>& sample_weight, std::string_view kind,
                               double temperature, bool compute_grad) {
  CotrainCall call = prepare_cotrain_loss(logits, target, weight, sample_weight, kind, temperature, compute_grad, c10::DeviceType::CPU);
  cpu::run_cotrain_loss(call.args);
  return call.outputs();
}

}  // namespace

}  // namespace ops
}  // namespace divco

TORCH_LIBRARY_IMPL(divco, CPU, m) { m.impl("cotrain_loss_native", &divco::ops::cotrain_loss_cpu); }
