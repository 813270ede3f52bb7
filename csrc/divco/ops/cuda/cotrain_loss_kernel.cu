// CUDA kernel of divco::cotrain_loss_native. One block per row n handles all S branches, in
// the stages of the Triton kernel (kernels/cotrain_loss.py) and the CPU kernel:
//   1. softmax statistics    per branch, an online softmax over the row's K logits (each
//                            thread its strided share, then a block reduction): max, softmax
//                            sums of z/T and z, top-1, soft-target dot; cross-entropy, hits
//   2. probabilities          per class k, every branch in registers: z, p, pbar, ensemble
//   3. co-training partials   J_n and the per-branch KL (js) or masked mass (kl)
//   4. gradient write         dloss/dlogits (only when the gradient is wanted)
// Per-row partials go to global buffers that a second one-block kernel reduces in a fixed
// order, so results are deterministic. No host synchronisation: the weight is read here.
// Per-sample weights v_n (math::row_weight) scale row n's cross-entropies, J_n and gradient.
// The per-element formulas are those of ../../cotrain_math.h, shared with the CPU kernel.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../../cotrain_math.h"
#include "../dtype_dispatch.h"
#include "../kernel_args.h"
#include "block_reduce.cuh"
#include "launchers.h"
#include "typed_access.cuh"

namespace divco {
namespace ops {
namespace cuda {
namespace {

namespace m = divco::math;

// Per-thread, then per-block, statistics of one branch of one row.
struct BranchPartial {
  m::SoftmaxStats p;  // of z with scale 1/T
  m::SoftmaxStats q;  // of z with scale 1 (only when T != 1)
  float best;         // top-1 of the branch
  int best_index;
  float y_dot_z;      // soft targets: sum_k y_k z_k
  float y_sum;        // soft targets: sum_k y_k
  float y_best;       // soft targets: top-1 of y
  int y_best_index;
};

struct ShuffleBranchPartial {
  __device__ BranchPartial operator()(BranchPartial v, int o) const {
    BranchPartial r;
    r.p.max = shfl_down(v.p.max, o);
    r.p.sum = shfl_down(v.p.sum, o);
    r.q.max = shfl_down(v.q.max, o);
    r.q.sum = shfl_down(v.q.sum, o);
    r.best = shfl_down(v.best, o);
    r.best_index = shfl_down(v.best_index, o);
    r.y_dot_z = shfl_down(v.y_dot_z, o);
    r.y_sum = shfl_down(v.y_sum, o);
    r.y_best = shfl_down(v.y_best, o);
    r.y_best_index = shfl_down(v.y_best_index, o);
    return r;
  }
};

struct CombineBranchPartial {
  float inv_t;
  __device__ BranchPartial operator()(BranchPartial a, const BranchPartial& b) const {
    a.p = m::softmax_stats_merge(a.p, b.p, inv_t);
    a.q = m::softmax_stats_merge(a.q, b.q, 1.0f);
    if (m::argmax_prefers(b.best, b.best_index, a.best, a.best_index)) {
      a.best = b.best;
      a.best_index = b.best_index;
    }
    a.y_dot_z += b.y_dot_z;
    a.y_sum += b.y_sum;
    if (m::argmax_prefers(b.y_best, b.y_best_index, a.y_best, a.y_best_index)) {
      a.y_best = b.y_best;
      a.y_best_index = b.y_best_index;
    }
    return a;
  }
};

// The argmax reductions start from index K, which loses every tie; it survives only when
// every value is -inf, where torch.argmax answers 0.
__device__ __forceinline__ int first_index_if_empty(int index, int classes) { return index == classes ? 0 : index; }

// Block size bound of cotrain_rows_kernel<scalar_t, kBranches>: 16 branches keep 16 z, 16 p
// and 16 KL accumulators per thread, more than the 128 registers a 512-thread block allows
// (ptxas spilled): they run with 256 threads (up to 255 registers).
constexpr int max_threads_for_branches(int branches) { return branches <= 8 ? kMaxThreadsPerBlock : 256; }

// Per-branch statistics of one row, in shared memory (written by thread 0 in stage 1).
template <int kBranches>
struct RowStats {
  float max[kBranches], inv_sum_p[kBranches], log_sum_p[kBranches], inv_sum_q[kBranches];
  float branch_cot[kBranches];  // KL(p_s || pbar) (js) or the masked mass m_s (kl)
};

// ---- stage 1: softmax statistics of one branch (all threads get the block total) ----------
template <typename scalar_t>
__device__ __forceinline__ BranchPartial branch_statistics(const CotrainArgs& a, int64_t branch, const float* y_row,
                                                           BranchPartial* scratch) {
  const LogitsView& v = a.logits;
  const int K = static_cast<int>(v.classes);
  const float inv_t = a.inv_temperature;
  const bool same_q = inv_t == 1.0f;
  const bool soft = y_row != nullptr;
  BranchPartial part;
  part.p = m::softmax_stats_empty();
  part.q = m::softmax_stats_empty();
  part.best = -m::positive_infinity();
  part.best_index = K;  // loses every tie against a real index
  part.y_dot_z = 0.0f;
  part.y_sum = 0.0f;
  part.y_best = -m::positive_infinity();
  part.y_best_index = K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {  // int64: k + blockDim may pass 2^31
    const float z = load<scalar_t>(v.data, branch + k * v.stride_class);
    part.p = m::softmax_stats_add(part.p, z, inv_t);
    if (!same_q) part.q = m::softmax_stats_add(part.q, z, 1.0f);
    if (m::argmax_prefers(z, k, part.best, part.best_index)) {
      part.best = z;
      part.best_index = static_cast<int>(k);
    }
    if (soft) {
      const float y = y_row[k * a.target_soft_stride_class];
      part.y_dot_z += m::soft_target_term(y, z);
      part.y_sum += y;
      if (m::argmax_prefers(y, k, part.y_best, part.y_best_index)) {
        part.y_best = y;
        part.y_best_index = static_cast<int>(k);
      }
    }
  }
  return block_allreduce(part, ShuffleBranchPartial{}, CombineBranchPartial{inv_t}, scratch);
}

// ---- stage 2: probabilities of class k, every branch in registers --------------------------
// z[s], p[s] for s < S; returns sum_s p_s (S pbar).
template <typename scalar_t, int kBranches>
__device__ __forceinline__ float class_probabilities(const CotrainArgs& a, int64_t row, int64_t k, int S,
                                                     const RowStats<kBranches>& st, float (&z)[kBranches],
                                                     float (&p)[kBranches]) {
  const LogitsView& v = a.logits;
  float psum = 0.0f;
#pragma unroll
  for (int s = 0; s < kBranches; ++s) {
    if (s < S) {
      z[s] = load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class);
      p[s] = m::exp_f32((z[s] - st.max[s]) * a.inv_temperature) * st.inv_sum_p[s];
      psum = s == 0 ? p[s] : psum + p[s];
    }
  }
  return psum;
}

template <int kBranches>
__device__ __forceinline__ float log_probability(const RowStats<kBranches>& st, int s, float z, float inv_t) {
  return (z - st.max[s]) * inv_t - st.log_sum_p[s];
}

// The row's target: a class index (valid or not) or a soft target row.
struct RowTarget {
  bool soft;
  bool valid;          // hard targets: the index is in [0, K)
  int64_t index;       // hard targets: the class, -1 when invalid
  const float* y_row;  // soft targets: y_n, strided by target_soft_stride_class
  float y_sum = 1.0f;  // soft targets: sum_k y_k (filled by stage 1)
  int64_t label = -1;  // the class the hits compare with (soft: first argmax of y)
};

__device__ __forceinline__ RowTarget row_target(const CotrainArgs& a, int64_t n, int K) {
  RowTarget t{a.target_index == nullptr, true, -1, nullptr};
  if (t.soft) {
    t.y_row = a.target_soft + n * a.target_soft_stride_row;
  } else {
    const int64_t index = a.target_index[n * a.target_index_stride];
    t.valid = index >= 0 && index < K;
    t.index = t.valid ? index : -1;
    t.label = t.index;
  }
  return t;
}

// ---- stage 1 (row): every branch's softmax statistics into st; cross-entropy and hits -----
template <typename scalar_t, int kBranches>
__device__ __forceinline__ void softmax_statistics_stage(const CotrainArgs& a, int64_t n, int64_t row, int S, int K,
                                                         RowTarget& target, float row_weight,
                                                         RowStats<kBranches>& st, BranchPartial* scratch) {
  const LogitsView& v = a.logits;
  const float inv_t = a.inv_temperature;
  for (int s = 0; s < S; ++s) {
    const int64_t branch = row + s * v.stride_branch;
    const BranchPartial total = branch_statistics<scalar_t>(a, branch, target.y_row, scratch);
    const m::SoftmaxStats q = inv_t == 1.0f ? total.p : total.q;
    const float lse_z = m::softmax_log_normalizer(q.max, q.sum, 1.0f);
    if (target.soft) {
      target.y_sum = total.y_sum;
      target.label = first_index_if_empty(total.y_best_index, K);
    }
    if (threadIdx.x == 0) {
      st.max[s] = total.p.max;
      st.inv_sum_p[s] = 1.0f / total.p.sum;
      st.log_sum_p[s] = m::log_f32(total.p.sum);
      st.inv_sum_q[s] = 1.0f / q.sum;
      float ce;
      if (target.soft) {
        ce = total.y_sum * lse_z - total.y_dot_z;
      } else {
        ce = target.valid ? lse_z - load<scalar_t>(v.data, branch + target.index * v.stride_class) : m::quiet_nan();
      }
      a.row_ce[n * S + s] = ce * row_weight;
      a.row_hits[n * (S + 1) + s] = first_index_if_empty(total.best_index, K) == target.label ? 1 : 0;
    }
  }
}

// ---- stages 2-3 (row): ensemble, probabilities and this thread's co-training partials ------
// Every branch of class k in registers. branch_acc[s]: js KL(p_s || pbar), kl the masked mass
// m_s; kl_value: the kl term. Returns this thread's best ensemble class.
template <typename scalar_t, int kBranches>
__device__ __forceinline__ ArgMax cotrain_partials_stage(const CotrainArgs& a, int64_t n, int64_t row, int S, int K,
                                                         const RowStats<kBranches>& st, bool js,
                                                         float (&branch_acc)[kBranches], float& kl_value) {
  const LogitsView& v = a.logits;
  const float inv_t = a.inv_temperature;
  const float inv_branches = 1.0f / static_cast<float>(S);
  const float log_branches = m::log_f32(static_cast<float>(S));
  ArgMax ens_best{-m::positive_infinity(), K};
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float z[kBranches], p[kBranches];
    const float psum = class_probabilities<scalar_t, kBranches>(a, row, k, S, st, z, p);
    double ens_sum = 0.0;
#pragma unroll
    for (int s = 0; s < kBranches; ++s) {
      if (s < S) ens_sum = s == 0 ? static_cast<double>(z[s]) : m::mean_logit_add(ens_sum, z[s]);
    }
    const float ens = m::mean_logit_finish(ens_sum, v.inv_branches);
    store<scalar_t>(a.ensemble, n * K + k, ens);
    if (m::argmax_prefers(ens, k, ens_best.value, ens_best.index)) ens_best = {ens, static_cast<int>(k)};
    if (S > 1) {
      const float log_pbar = js ? m::log_f32(psum) - log_branches : 0.0f;
      const float pbar = psum * inv_branches;
#pragma unroll
      for (int s = 0; s < kBranches; ++s) {
        if (s < S) {
          const float log_p = log_probability(st, s, z[s], inv_t);
          if (js) {
            branch_acc[s] += m::js_kl_element(p[s], log_p, log_pbar);
          } else {
            kl_value += m::kl_value_element(p[s], pbar, log_p);
            branch_acc[s] += m::kl_masked_mass_element(pbar, log_p);
          }
        }
      }
    }
  }
  return ens_best;
}

// ---- stage 4 (row): gradient (1/N) dCE + w/(N T) dJ, written contiguous [N, S, K] ---------
template <typename scalar_t, int kBranches>
__device__ __forceinline__ void gradient_stage(const CotrainArgs& a, int64_t n, int64_t row, int S, int K,
                                               const RowTarget& target, float row_weight,
                                               const RowStats<kBranches>& st, bool js) {
  const LogitsView& v = a.logits;
  const float inv_t = a.inv_temperature;
  const float inv_branches = 1.0f / static_cast<float>(S);
  const float log_branches = m::log_f32(static_cast<float>(S));
  const float kl_factor = S > 1 ? static_cast<float>(S) / static_cast<float>(S - 1) : 0.0f;
  const float inv_batch = 1.0f / static_cast<float>(v.rows);
  const float inv_rows = inv_batch * row_weight;  // v_n / N
  const float cot_scale = S > 1 ? a.weight[0] * inv_t * inv_batch * row_weight : 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float z[kBranches], p[kBranches];
    const float psum = class_probabilities<scalar_t, kBranches>(a, row, k, S, st, z, p);
    const float log_pbar = js ? m::log_f32(psum) - log_branches : 0.0f;
    const float pbar = psum * inv_branches;
    const float y = target.soft ? target.y_row[k * a.target_soft_stride_class] : (k == target.index ? 1.0f : 0.0f);
#pragma unroll
    for (int s = 0; s < kBranches; ++s) {
      if (s < S) {
        const float q = inv_t == 1.0f ? p[s] : m::exp_f32(z[s] - st.max[s]) * st.inv_sum_q[s];
        float cot_grad = 0.0f;
        if (S > 1) {
          const float log_p = log_probability(st, s, z[s], inv_t);
          cot_grad = js ? m::js_grad_element(p[s], log_p, log_pbar, st.branch_cot[s], inv_branches)
                        : m::kl_grad_element(p[s], pbar, log_p, st.branch_cot[s], kl_factor);
        }
        const float ce_grad = m::ce_grad_element(q, y, target.y_sum);
        const float g = target.valid ? m::loss_grad_element(ce_grad, cot_grad, inv_rows, cot_scale) : m::quiet_nan();
        store<stored_grad_t<scalar_t>>(a.grad, (n * S + s) * K + k, g);
      }
    }
  }
}

// One block per row n, the stages of kernels/cotrain_loss.py in order.
template <typename scalar_t, int kBranches>
__global__ void __launch_bounds__(max_threads_for_branches(kBranches)) cotrain_rows_kernel(const CotrainArgs a) {
  const LogitsView& v = a.logits;
  const int64_t n = blockIdx.x;
  const int S = static_cast<int>(v.branches);
  const int K = static_cast<int>(v.classes);
  const int64_t row = n * v.stride_row;
  const bool js = a.kind == CotrainKind::kJensenShannon;

  __shared__ BranchPartial partial_scratch[32];
  __shared__ ArgMax argmax_scratch[32];
  __shared__ float float_scratch[32];
  __shared__ RowStats<kBranches> st;

  RowTarget target = row_target(a, n, K);
  const float row_weight = m::row_weight(a.sample_weight, a.sample_weight_stride, n);
  softmax_statistics_stage<scalar_t, kBranches>(a, n, row, S, K, target, row_weight, st, partial_scratch);
  __syncthreads();  // st visible to every thread

  float branch_acc[kBranches];
#pragma unroll
  for (int s = 0; s < kBranches; ++s) branch_acc[s] = 0.0f;
  float kl_value = 0.0f;
  const ArgMax ens_best = cotrain_partials_stage<scalar_t, kBranches>(a, n, row, S, K, st, js, branch_acc, kl_value);
  const ArgMax ens_total = block_allreduce(ens_best, ShuffleArgMax{}, CombineArgMax{}, argmax_scratch);
  float cot = 0.0f;
  if (S > 1) {  // the row's co-training term: block sums of the partials
    float kl_sum = 0.0f;
    if (js || a.grad != nullptr) {  // kl: the masked masses only serve the gradient
#pragma unroll
      for (int s = 0; s < kBranches; ++s) {
        if (s < S) {
          const float total = block_sum(branch_acc[s], float_scratch);
          if (threadIdx.x == 0) st.branch_cot[s] = total;
          kl_sum += total;
        }
      }
    }
    const float inv_branches = 1.0f / static_cast<float>(S);
    const float kl_factor = static_cast<float>(S) / static_cast<float>(S - 1);
    cot = js ? kl_sum * inv_branches : block_sum(kl_value, float_scratch) * kl_factor;
  }
  if (threadIdx.x == 0) {
    a.row_cot[n] = cot * row_weight;
    a.row_hits[n * (S + 1) + S] = first_index_if_empty(ens_total.index, K) == target.label ? 1 : 0;
  }
  if (a.grad == nullptr) return;
  __syncthreads();  // st.branch_cot visible
  gradient_stage<scalar_t, kBranches>(a, n, row, S, K, target, row_weight, st, js);
}

// Reduces the per-row partials in a fixed order (one block; double accumulation).
__global__ void cotrain_finalize_kernel(const CotrainArgs a) {
  __shared__ double double_scratch[32];
  __shared__ long long count_scratch[32];
  const int64_t N = a.logits.rows;
  const int S = static_cast<int>(a.logits.branches);
  auto sum_double = [&](double value) {
    return block_allreduce(
        value, [](double x, int o) { return shfl_down(x, o); }, [](double x, double y) { return x + y; },
        double_scratch);
  };
  auto sum_count = [&](long long value) {
    return block_allreduce(
        value, [](long long x, int o) { return shfl_down(x, o); }, [](long long x, long long y) { return x + y; },
        count_scratch);
  };
  double cot = 0.0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) cot += a.row_cot[n];
  cot = sum_double(cot) / static_cast<double>(N);
  double loss = 0.0;
  for (int s = 0; s < S; ++s) {
    double ce = 0.0;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) ce += a.row_ce[n * S + s];
    ce = sum_double(ce) / static_cast<double>(N);
    if (threadIdx.x == 0) a.ce[s] = static_cast<float>(ce);
    loss += ce;
  }
  for (int j = 0; j <= S; ++j) {
    long long hits = 0;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) hits += a.row_hits[n * (S + 1) + j];
    hits = sum_count(hits);
    if (threadIdx.x == 0) a.correct[j] = hits;
  }
  if (threadIdx.x == 0) {
    a.cot[0] = static_cast<float>(cot);
    a.loss[0] = static_cast<float>(loss + static_cast<double>(a.weight[0]) * cot);
  }
}

template <typename scalar_t, int kBranches>
void launch_rows(const CotrainArgs& a, cudaStream_t stream) {
  const int threads = threads_for_classes(a.logits.classes, max_threads_for_branches(kBranches));
  cotrain_rows_kernel<scalar_t, kBranches><<<static_cast<unsigned>(a.logits.rows), threads, 0, stream>>>(a);
}

}  // namespace

cudaError_t launch_cotrain_loss(const CotrainArgs& a, cudaStream_t stream) {
  // The host wrapper has checked 1 <= S <= kMaxBranches and 1 <= K < 2^31.
  if (a.logits.rows > 0) {
    dispatch_logits_dtype(a.logits.dtype, [&](auto dtype) {
      using scalar_t = decltype(dtype);
      const int64_t S = a.logits.branches;
      if (S <= 2) {
        launch_rows<scalar_t, 2>(a, stream);
      } else if (S <= 4) {
        launch_rows<scalar_t, 4>(a, stream);
      } else if (S <= 8) {
        launch_rows<scalar_t, 8>(a, stream);
      } else {
        launch_rows<scalar_t, kMaxBranches>(a, stream);
      }
    });
  }
  cotrain_finalize_kernel<<<1, 256, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ops
}  // namespace divco
