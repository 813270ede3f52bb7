// CPU kernel of divco::cotrain_loss_native: rows in parallel (at::parallel_for), each row
// converted once to float32 in a per-thread workspace, then every output of the row
// (cross-entropies, co-training term, hits, ensemble, gradient) computed from that copy
// with vectorised loops (row_loops.h). Per-row partials are reduced afterwards in row
// order, in double, so the result is bit-identical for any thread count.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
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
using math::log_f32;

// Per-thread buffers for one row.
struct RowWorkspace {
  std::vector<float> storage;
  float* z;        // [S, K] logits as float
  float* exp_p;    // [S, K] exp((z - max) / T); p = exp_p / sum
  float* exp_q;    // [S, K] exp(z - max); q = exp_q / sum; aliases exp_p when T == 1
  float* y;        // [K] soft target row
  float* pbar;     // [K] mean_s p (kl) or log of it (js)
  float* ensemble; // [K] mean of the branch logits
  std::vector<float> max, inv_sum_p, log_sum_p, inv_sum_q, lse_z, kl;  // [S] per branch

  RowWorkspace(int64_t S, int64_t K, bool separate_q) {
    const int64_t planes = S * (separate_q ? 3 : 2) + 3;
    storage.resize(static_cast<size_t>(planes * K));
    z = storage.data();
    exp_p = z + S * K;
    exp_q = separate_q ? exp_p + S * K : exp_p;
    y = exp_q + S * K;
    pbar = y + K;
    ensemble = pbar + K;
    for (auto* v : {&max, &inv_sum_p, &log_sum_p, &inv_sum_q, &lse_z, &kl}) v->assign(static_cast<size_t>(S), 0.0f);
  }
};

// What the gradient of one branch of one row needs (see cotrain_row).
struct GradRow {
  const float *z, *exp_p, *exp_q, *y, *pbar;
  float max, inv_sum_p, inv_sum_q, log_sum_p, kl;
  float inv_t, inv_branches, kl_factor, target_sum, inv_rows, cot_scale;
};

enum class CotGrad { kNone, kJensenShannon, kPairwiseKL };

// g[k] = dloss/dz_sk. One instantiation per case, so each loop is branch-free and vectorises.
template <typename scalar_t, CotGrad kCot, bool kSoft>
DIVCO_CPU_INLINE void write_grad_row(const GradRow& r, int64_t K, int64_t target, scalar_t* g) {
  auto element = [&](int64_t k, float y) {
    const float p = r.exp_p[k] * r.inv_sum_p;
    const float q = r.exp_q[k] * r.inv_sum_q;
    float cot_grad = 0.0f;
    if constexpr (kCot == CotGrad::kJensenShannon) {
      cot_grad = math::js_grad_element(p, (r.z[k] - r.max) * r.inv_t - r.log_sum_p, r.pbar[k], r.kl, r.inv_branches);
    } else if constexpr (kCot == CotGrad::kPairwiseKL) {
      cot_grad = math::kl_grad_element(p, r.pbar[k], r.kl_factor);
    }
    return math::loss_grad_element(math::ce_grad_element(q, y, r.target_sum), cot_grad, r.inv_rows, r.cot_scale);
  };
  if constexpr (kSoft) {
    for (int64_t k = 0; k < K; ++k) g[k] = from_float<scalar_t>(element(k, r.y[k]));
  } else {
    for (int64_t k = 0; k < K; ++k) g[k] = from_float<scalar_t>(element(k, 0.0f));
    g[target] = from_float<scalar_t>(element(target, 1.0f));  // y = one-hot(target)
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void cotrain_row(const CotrainArgs& a, int64_t n, RowWorkspace& w) {
  const LogitsView& v = a.logits;
  const int64_t S = v.branches, K = v.classes, N = v.rows;
  const float inv_t = a.inv_temperature;
  const bool same_q = w.exp_q == w.exp_p;
  const bool soft = a.target_index == nullptr;
  const auto* logits = static_cast<const scalar_t*>(v.data) + n * v.stride_row;

  // Target: a class index (-1 when out of range: NaN row), or a soft row and its top-1.
  int64_t target_class = -1;
  bool target_valid = true;
  float target_sum = 1.0f;
  if (!soft) {
    const int64_t t = a.target_index[n * a.target_index_stride];
    target_valid = t >= 0 && t < K;
    target_class = target_valid ? t : -1;
  } else {
    const float* y_src = a.target_soft + n * a.target_soft_stride_row;
    for (int64_t k = 0; k < K; ++k) w.y[k] = y_src[k * a.target_soft_stride_class];
    const float* y = w.y;
    target_sum = lane_sum(K, [&](int64_t k) { return y[k]; });
    target_class = lane_max_argmax(y, K).index;
  }

  // Logits to float; per-branch max and top-1.
  int32_t* hits = a.row_hits + n * (S + 1);
  for (int64_t s = 0; s < S; ++s) {
    float* z = w.z + s * K;
    load_row(logits + s * v.stride_branch, v.stride_class, K, z);
    const MaxArgMax top = lane_max_argmax(z, K);
    w.max[s] = top.max;
    hits[s] = top.index == target_class ? 1 : 0;
  }

  // Ensemble: mean of the branch logits (branch order fixed), and its top-1.
  {
    float* e = w.ensemble;
    for (int64_t k = 0; k < K; ++k) e[k] = w.z[k];
    for (int64_t s = 1; s < S; ++s) {
      const float* z = w.z + s * K;
      for (int64_t k = 0; k < K; ++k) e[k] += z[k];
    }
    const float branches = static_cast<float>(S);
    auto* out = static_cast<scalar_t*>(a.ensemble) + n * K;
    for (int64_t k = 0; k < K; ++k) {
      e[k] = e[k] / branches;
      out[k] = from_float<scalar_t>(e[k]);
    }
    hits[S] = lane_max_argmax(e, K).index == target_class ? 1 : 0;
  }

  // Softmax sums: p = softmax(z / T) for the co-training term, q = softmax(z) for the CE.
  for (int64_t s = 0; s < S; ++s) {
    const float* z = w.z + s * K;
    float* exp_p = w.exp_p + s * K;
    const float m = w.max[s];
    const float sum_p = lane_sum(K, [&](int64_t k) {
      const float e = exp_f32((z[k] - m) * inv_t);
      exp_p[k] = e;
      return e;
    });
    w.inv_sum_p[s] = 1.0f / sum_p;
    w.log_sum_p[s] = log_f32(sum_p);
    float sum_q = sum_p;
    if (!same_q) {
      float* exp_q = w.exp_q + s * K;
      sum_q = lane_sum(K, [&](int64_t k) {
        const float e = exp_f32(z[k] - m);
        exp_q[k] = e;
        return e;
      });
    }
    w.inv_sum_q[s] = 1.0f / sum_q;
    w.lse_z[s] = math::softmax_log_normalizer(m, sum_q, 1.0f);
  }

  // Cross-entropy per branch.
  float* row_ce = a.row_ce + n * S;
  for (int64_t s = 0; s < S; ++s) {
    const float* z = w.z + s * K;
    if (!soft) {
      row_ce[s] = target_valid ? w.lse_z[s] - z[target_class] : math::quiet_nan();
    } else {
      const float* y = w.y;
      const float y_dot_z = lane_sum(K, [&](int64_t k) { return y[k] * z[k]; });
      row_ce[s] = target_sum * w.lse_z[s] - y_dot_z;
    }
  }

  // Co-training term. p_sk = exp_p * inv_sum (the same expression everywhere below);
  // log p_sk = (z_sk - max_s) / T - log sum_s, finite for finite logits.
  const float inv_branches = 1.0f / static_cast<float>(S);
  float cot = 0.0f;
  if (S > 1) {
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
      // pbar now holds log pbar_k = log(sum_s p_sk) - log S: that sum never underflows to 0
      // where some p_sk is nonzero.
      const float log_branches = std::log(static_cast<float>(S));
      for (int64_t k = 0; k < K; ++k) pbar[k] = log_f32(pbar[k]) - log_branches;
      float kl_sum = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        const float* z = w.z + s * K;
        const float* e = w.exp_p + s * K;
        const float m = w.max[s], inv = w.inv_sum_p[s], log_sum = w.log_sum_p[s];
        w.kl[s] = lane_sum(K, [&](int64_t k) {
          return math::js_kl_element(e[k] * inv, (z[k] - m) * inv_t - log_sum, pbar[k]);
        });
        kl_sum += w.kl[s];
      }
      cot = kl_sum * inv_branches;
    } else {
      for (int64_t k = 0; k < K; ++k) pbar[k] = pbar[k] * inv_branches;
      float total = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        const float* z = w.z + s * K;
        const float* e = w.exp_p + s * K;
        const float m = w.max[s], inv = w.inv_sum_p[s], log_sum = w.log_sum_p[s];
        total += lane_sum(K, [&](int64_t k) {
          return math::kl_value_element(e[k] * inv, pbar[k], (z[k] - m) * inv_t - log_sum);
        });
      }
      cot = total * (static_cast<float>(S) / static_cast<float>(S - 1));
    }
  }
  a.row_cot[n] = cot;

  if (a.grad == nullptr) return;

  // Gradient of the loss (grad_output = 1): (1/N) dCE + w/(N T) dJ.
  const float inv_rows = 1.0f / static_cast<float>(N);
  const float cot_scale = S > 1 ? a.weight[0] * inv_t * inv_rows : 0.0f;
  const float kl_factor = S > 1 ? static_cast<float>(S) / static_cast<float>(S - 1) : 0.0f;
  const bool js = a.kind == CotrainKind::kJensenShannon;
  for (int64_t s = 0; s < S; ++s) {
    auto* g = static_cast<scalar_t*>(a.grad) + (n * S + s) * K;
    if (!target_valid) {
      for (int64_t k = 0; k < K; ++k) g[k] = from_float<scalar_t>(math::quiet_nan());
      continue;
    }
    GradRow r;
    r.z = w.z + s * K;
    r.exp_p = w.exp_p + s * K;
    r.exp_q = w.exp_q + s * K;
    r.y = w.y;
    r.pbar = w.pbar;
    r.max = w.max[s];
    r.inv_sum_p = w.inv_sum_p[s];
    r.inv_sum_q = w.inv_sum_q[s];
    r.log_sum_p = w.log_sum_p[s];
    r.kl = w.kl[s];
    r.inv_t = inv_t;
    r.inv_branches = inv_branches;
    r.kl_factor = kl_factor;
    r.target_sum = target_sum;
    r.inv_rows = inv_rows;
    r.cot_scale = cot_scale;
    const int64_t target = soft ? -1 : target_class;
    if (S == 1) {
      soft ? write_grad_row<scalar_t, CotGrad::kNone, true>(r, K, target, g)
           : write_grad_row<scalar_t, CotGrad::kNone, false>(r, K, target, g);
    } else if (js) {
      soft ? write_grad_row<scalar_t, CotGrad::kJensenShannon, true>(r, K, target, g)
           : write_grad_row<scalar_t, CotGrad::kJensenShannon, false>(r, K, target, g);
    } else {
      soft ? write_grad_row<scalar_t, CotGrad::kPairwiseKL, true>(r, K, target, g)
           : write_grad_row<scalar_t, CotGrad::kPairwiseKL, false>(r, K, target, g);
    }
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void cotrain_rows(const CotrainArgs& a, int64_t begin, int64_t end) {
  RowWorkspace w(a.logits.branches, a.logits.classes, a.inv_temperature != 1.0f);
  for (int64_t n = begin; n < end; ++n) cotrain_row<scalar_t>(a, n, w);
}

// One cloned entry point per logits dtype (target_clones does not apply to templates).
DIVCO_CPU_TARGET_CLONES void cotrain_rows_f32(const CotrainArgs& a, int64_t begin, int64_t end) {
  cotrain_rows<float>(a, begin, end);
}
DIVCO_CPU_TARGET_CLONES void cotrain_rows_bf16(const CotrainArgs& a, int64_t begin, int64_t end) {
  cotrain_rows<c10::BFloat16>(a, begin, end);
}
DIVCO_CPU_TARGET_CLONES void cotrain_rows_f16(const CotrainArgs& a, int64_t begin, int64_t end) {
  cotrain_rows<c10::Half>(a, begin, end);
}

// Fewest rows worth a thread: about 4096 logits (some 20 us of work) amortise the OpenMP
// fork/join and the workspace. at::parallel_for splits the rows evenly over the threads.
int64_t grain_size(int64_t branches, int64_t classes) {
  const int64_t per_row = branches * classes;
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(per_row, 1));
}

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
  const int64_t N = a.logits.rows;
  at::parallel_for(0, N, grain_size(a.logits.branches, a.logits.classes), [&](int64_t begin, int64_t end) {
    switch (a.logits.dtype) {
      case LogitsDtype::kFloat32:
        cotrain_rows_f32(a, begin, end);
        break;
      case LogitsDtype::kBFloat16:
        cotrain_rows_bf16(a, begin, end);
        break;
      case LogitsDtype::kFloat16:
        cotrain_rows_f16(a, begin, end);
        break;
    }
  });
  finalize(a);
}

}  // namespace cpu

CotrainResult cotrain_loss_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                               std::string_view kind, double temperature, bool compute_grad) {
  CotrainCall call = prepare_cotrain(logits, target, weight, kind, temperature, compute_grad, c10::DeviceType::CPU);
  cpu::run_cotrain_loss(call.args);
  return call.outputs();
}

}  // namespace ops
}  // namespace divco
