// CUDA kernels of divco::ensemble_native and divco::ensemble_backward_native: one block per
// row, online softmax over K (block reductions), fp32 arithmetic, up to
// kMaxEnsembleBranches branches (mean_probs / max_probs keep two floats per branch in
// shared memory, vote one int; the other modes take any S). Per-branch weights (optional)
// arrive normalised (prepare_ensemble); each thread reads them (S broadcast loads).
// Formulas from ../../cotrain_math.h, shared with the CPU kernels.
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

struct ShuffleStats {
  __device__ m::SoftmaxStats operator()(m::SoftmaxStats v, int o) const {
    return {shfl_down(v.max, o), shfl_down(v.sum, o)};
  }
};
struct MergeStats {
  __device__ m::SoftmaxStats operator()(m::SoftmaxStats a, const m::SoftmaxStats& b) const {
    return m::softmax_stats_merge(a, b, 1.0f);
  }
};

// Mean over branches of class k of the row starting at `row` (branch order fixed; double
// accumulator, see math::mean_logit_add).
template <typename scalar_t>
__device__ __forceinline__ float mean_logit(const LogitsView& v, int64_t row, int64_t k) {
  double sum = 0.0;
  for (int s = 0; s < static_cast<int>(v.branches); ++s) {
    const float z = load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class);
    sum = s == 0 ? static_cast<double>(z) : m::mean_logit_add(sum, z);
  }
  return m::mean_logit_finish(sum, v.inv_branches);
}

// Σ_s w_s z_s for class k (normalised weights; see math::weighted_logit_add).
template <typename scalar_t>
__device__ __forceinline__ float weighted_mean_logit(const LogitsView& v, int64_t row, int64_t k,
                                                     const float* weights) {
  float sum = 0.0f;
  for (int s = 0; s < static_cast<int>(v.branches); ++s) {
    const float z = load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class);
    sum = m::weighted_logit_add(sum, weights[s], z);
  }
  return sum;
}

// The (weighted) mean logit of class k: weights == nullptr is the unweighted mean.
template <typename scalar_t>
__device__ __forceinline__ float branch_mean_logit(const LogitsView& v, int64_t row, int64_t k,
                                                   const float* weights) {
  return weights != nullptr ? weighted_mean_logit<scalar_t>(v, row, k, weights) : mean_logit<scalar_t>(v, row, k);
}

// The top-1 class of one branch (all threads get it).
template <typename scalar_t>
__device__ int branch_top1(const LogitsView& v, int64_t branch, ArgMax* scratch) {
  ArgMax best{-m::positive_infinity(), 2147483647};  // the index sentinel loses every tie
  for (int64_t k = threadIdx.x; k < v.classes; k += blockDim.x) {
    const float z = load<scalar_t>(v.data, branch + k * v.stride_class);
    if (m::argmax_prefers(z, k, best.value, best.index)) best = {z, static_cast<int>(k)};
  }
  return block_allreduce(best, ShuffleArgMax{}, CombineArgMax{}, scratch).index;
}

// p_sk from the branch statistics in shared memory (max, 1 / sum).
template <typename scalar_t>
__device__ __forceinline__ float branch_probability(const LogitsView& v, int64_t row, int s, int64_t k,
                                                    const float* s_max, const float* s_inv_sum) {
  const float z = load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class);
  return m::exp_f32(z - s_max[s]) * s_inv_sum[s];
}

// Every branch's softmax statistics into shared memory (max, 1 / sum); synchronises.
template <typename scalar_t>
__device__ void all_branch_stats(const LogitsView& v, int64_t row, float* s_max, float* s_inv_sum,
                                 m::SoftmaxStats* scratch);

// The first branch holding NaN at class k, else the first maximal one (torch.max), of the
// values value(s).
template <typename Value>
__device__ __forceinline__ int first_max_branch(int S, Value value) {
  int best = 0;
  float best_value = value(0);
  for (int s = 1; s < S; ++s) {
    const float x = value(s);
    if (m::argmax_prefers(x, s, best_value, best)) {
      best = s;
      best_value = x;
    }
  }
  return best;
}

// Softmax statistics of one branch (all threads get the block total).
template <typename scalar_t>
__device__ m::SoftmaxStats branch_stats(const LogitsView& v, int64_t branch, m::SoftmaxStats* scratch) {
  m::SoftmaxStats stats = m::softmax_stats_empty();
  for (int64_t k = threadIdx.x; k < v.classes; k += blockDim.x) {
    stats = m::softmax_stats_add(stats, load<scalar_t>(v.data, branch + k * v.stride_class), 1.0f);
  }
  return block_allreduce(stats, ShuffleStats{}, MergeStats{}, scratch);
}

template <typename scalar_t>
__device__ void all_branch_stats(const LogitsView& v, int64_t row, float* s_max, float* s_inv_sum,
                                 m::SoftmaxStats* scratch) {
  for (int s = 0; s < static_cast<int>(v.branches); ++s) {
    const m::SoftmaxStats stats = branch_stats<scalar_t>(v, row + s * v.stride_branch, scratch);
    if (threadIdx.x == 0) {
      s_max[s] = stats.max;
      s_inv_sum[s] = 1.0f / stats.sum;
    }
  }
  __syncthreads();
}

// Softmax statistics of the mean logits of the row.
template <typename scalar_t>
__device__ m::SoftmaxStats mean_logit_stats(const LogitsView& v, int64_t row, const float* weights,
                                            m::SoftmaxStats* scratch) {
  m::SoftmaxStats stats = m::softmax_stats_empty();
  for (int64_t k = threadIdx.x; k < v.classes; k += blockDim.x) {
    stats = m::softmax_stats_add(stats, branch_mean_logit<scalar_t>(v, row, k, weights), 1.0f);
  }
  return block_allreduce(stats, ShuffleStats{}, MergeStats{}, scratch);
}

// Dynamic shared memory: 2 * S floats (per-branch max and 1/sum) for mean_probs and max_probs,
// S ints (each branch's top-1 class) for vote.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) ensemble_kernel(const EnsembleArgs a) {
  extern __shared__ float branch_stats_smem[];
  __shared__ m::SoftmaxStats stats_scratch[32];
  __shared__ ArgMax top1_scratch[32];
  const LogitsView& v = a.logits;
  const int64_t n = blockIdx.x;
  const int S = static_cast<int>(v.branches);
  const int K = static_cast<int>(v.classes);
  const int64_t row = n * v.stride_row;
  const int64_t out_row = n * K;
  const float* weights = a.weights;
  const float inv_branches = 1.0f / static_cast<float>(S);
  switch (a.mode) {
    case EnsembleMode::kMeanLogits:
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        store<scalar_t>(a.out, out_row + k, branch_mean_logit<scalar_t>(v, row, k, weights));
      }
      break;
    case EnsembleMode::kVote: {
      int* top1 = reinterpret_cast<int*>(branch_stats_smem);
      for (int s = 0; s < S; ++s) {
        const int best = branch_top1<scalar_t>(v, row + s * v.stride_branch, top1_scratch);
        if (threadIdx.x == 0) top1[s] = best;
      }
      __syncthreads();
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        float share = 0.0f;  // weighted: Σ_s w_s [top1_s = k]; else the count of votes, / S below
        for (int s = 0; s < S; ++s) {
          if (top1[s] == k) share += weights != nullptr ? weights[s] : 1.0f;
        }
        store<scalar_t>(a.out, out_row + k, weights != nullptr ? share : share * inv_branches);
      }
      break;
    }
    case EnsembleMode::kMax:
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        float best = load<scalar_t>(v.data, row + k * v.stride_class);
        for (int s = 1; s < S; ++s) best = m::max_nan(best, load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class));
        store<scalar_t>(a.out, out_row + k, best);
      }
      break;
    case EnsembleMode::kMeanProbs:
    case EnsembleMode::kMaxProbs: {
      float* s_max = branch_stats_smem;
      float* s_inv_sum = branch_stats_smem + S;
      all_branch_stats<scalar_t>(v, row, s_max, s_inv_sum, stats_scratch);
      const bool mean = a.mode == EnsembleMode::kMeanProbs;
      const bool weighted = mean && weights != nullptr;
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        float acc = mean ? 0.0f : branch_probability<scalar_t>(v, row, 0, k, s_max, s_inv_sum);
        for (int s = mean ? 0 : 1; s < S; ++s) {
          if (weighted) {
            const float w = weights[s];
            if (w != 0.0f) acc += w * branch_probability<scalar_t>(v, row, s, k, s_max, s_inv_sum);
            continue;
          }
          const float p = branch_probability<scalar_t>(v, row, s, k, s_max, s_inv_sum);
          acc = mean ? acc + p : m::max_nan(acc, p);
        }
        store<scalar_t>(a.out, out_row + k, !mean || weighted ? acc : acc / static_cast<float>(S));
      }
      break;
    }
    case EnsembleMode::kGeoMean: {
      // softmax(Σ_s w_s log_softmax(z_s)) = softmax(Σ_s w_s z_s).
      const m::SoftmaxStats stats = mean_logit_stats<scalar_t>(v, row, weights, stats_scratch);
      const float inv_sum = 1.0f / stats.sum;
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        const float mean = branch_mean_logit<scalar_t>(v, row, k, weights);
        store<scalar_t>(a.out, out_row + k, m::exp_f32(mean - stats.max) * inv_sum);
      }
      break;
    }
  }
}

// Dynamic shared memory: 2 * S floats (per-branch max and 1/sum) for max_probs.
// kWeighted: compiled apart, so that the unweighted kernel keeps its registers (the weights
// pointer, live through the mean_probs loop, made ptxas spill in a single kernel).
template <typename scalar_t, bool kWeighted>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) ensemble_backward_kernel(const EnsembleBackwardArgs a) {
  extern __shared__ float branch_stats_smem[];
  __shared__ m::SoftmaxStats stats_scratch[32];
  __shared__ float float_scratch[32];
  const LogitsView& v = a.logits;
  const int64_t n = blockIdx.x;
  const int S = static_cast<int>(v.branches);
  const int K = static_cast<int>(v.classes);
  const int64_t row = n * v.stride_row;
  const int64_t g_row = n * a.grad_out_stride_row;
  const float inv_branches = 1.0f / static_cast<float>(S);
  const float* weights = kWeighted ? a.weights : nullptr;
  auto grad_out = [&](int64_t k) { return load<scalar_t>(a.grad_out, g_row + k * a.grad_out_stride_class); };
  auto out_offset = [&](int s, int64_t k) { return (n * S + s) * static_cast<int64_t>(K) + k; };
  switch (a.mode) {
    case EnsembleMode::kMeanLogits: {
          for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        if (weights != nullptr) {
          const float g = grad_out(k);
          for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), m::weighted_term(weights[s], g));
          continue;
        }
        const float g = grad_out(k) / static_cast<float>(S);
        for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), g);
      }
      break;
    }
    case EnsembleMode::kVote:  // piecewise constant
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), 0.0f);
      }
      break;
    case EnsembleMode::kMax:
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        const int best = first_max_branch(
            S, [&](int s) { return load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class); });
        const float g = grad_out(k);
        for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), s == best ? g : 0.0f);
      }
      break;
    case EnsembleMode::kMaxProbs: {
      // out_k = p_{b(k),k}: branch s gets the softmax backward of the g_k it holds the max of,
      // p_s (g_held - <g_held, p_s>). b(k) is recomputed per branch (O(S^2 K), S is small).
      float* s_max = branch_stats_smem;
      float* s_inv_sum = branch_stats_smem + S;
      all_branch_stats<scalar_t>(v, row, s_max, s_inv_sum, stats_scratch);
      auto probability = [&](int s, int64_t k) { return branch_probability<scalar_t>(v, row, s, k, s_max, s_inv_sum); };
      for (int s = 0; s < S; ++s) {
        float dot = 0.0f;
        for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
          if (first_max_branch(S, [&](int t) { return probability(t, k); }) == s) dot += grad_out(k) * probability(s, k);
        }
        dot = block_sum(dot, float_scratch);
        for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
          const float held = first_max_branch(S, [&](int t) { return probability(t, k); }) == s ? grad_out(k) : 0.0f;
          store<scalar_t>(a.grad_logits, out_offset(s, k), m::softmax_backward_element(probability(s, k), held, dot, 1.0f));
        }
      }
      break;
    }
    case EnsembleMode::kMeanProbs: {
          for (int s = 0; s < S; ++s) {
        // weight 0: no part, no gradient (its logits may be NaN): weighted_term below
        const int64_t branch = row + s * v.stride_branch;
        const m::SoftmaxStats stats = branch_stats<scalar_t>(v, branch, stats_scratch);
        const float inv_sum = 1.0f / stats.sum;
        float dot = 0.0f;
        for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
          dot += grad_out(k) * (m::exp_f32(load<scalar_t>(v.data, branch + k * v.stride_class) - stats.max) * inv_sum);
        }
        dot = block_sum(dot, float_scratch);
        const float factor = weights != nullptr ? weights[s] : inv_branches;
        for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
          const float p = m::exp_f32(load<scalar_t>(v.data, branch + k * v.stride_class) - stats.max) * inv_sum;
          const float grad = factor == 0.0f ? 0.0f : m::softmax_backward_element(p, grad_out(k), dot, factor);
          store<scalar_t>(a.grad_logits, out_offset(s, k), grad);
        }
      }
      break;
    }
    case EnsembleMode::kGeoMean: {
      const m::SoftmaxStats stats = mean_logit_stats<scalar_t>(v, row, weights, stats_scratch);
      const float inv_sum = 1.0f / stats.sum;
      float dot = 0.0f;
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        dot += grad_out(k) * (m::exp_f32(branch_mean_logit<scalar_t>(v, row, k, weights) - stats.max) * inv_sum);
      }
      dot = block_sum(dot, float_scratch);
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        const float e = m::exp_f32(branch_mean_logit<scalar_t>(v, row, k, weights) - stats.max) * inv_sum;
        if (weights != nullptr) {  // w_s e_k (g_k - <g, e>)
          const float g = m::softmax_backward_element(e, grad_out(k), dot, 1.0f);
          for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), m::weighted_term(weights[s], g));
          continue;
        }
        const float g = m::softmax_backward_element(e, grad_out(k), dot, inv_branches);
        for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), g);
      }
      break;
    }
  }
}

// Dynamic shared memory of the modes that keep per-branch values: two floats per branch
// (softmax statistics), or one int (vote: the top-1 class; forward only).
size_t branch_stats_bytes(EnsembleMode mode, int64_t branches, bool forward) {
  if (mode == EnsembleMode::kMeanProbs || mode == EnsembleMode::kMaxProbs) {
    return 2 * sizeof(float) * static_cast<size_t>(branches);
  }
  return mode == EnsembleMode::kVote && forward ? sizeof(int) * static_cast<size_t>(branches) : 0;
}

}  // namespace

cudaError_t launch_ensemble(const EnsembleArgs& a, cudaStream_t stream) {
  if (a.logits.rows == 0) return cudaSuccess;
  dispatch_logits_dtype(a.logits.dtype, [&](auto dtype) {
    ensemble_kernel<decltype(dtype)><<<static_cast<unsigned>(a.logits.rows), threads_for_classes(a.logits.classes),
                                       branch_stats_bytes(a.mode, a.logits.branches, true), stream>>>(a);
  });
  return cudaGetLastError();
}

cudaError_t launch_ensemble_backward(const EnsembleBackwardArgs& a, cudaStream_t stream) {
  if (a.logits.rows == 0) return cudaSuccess;
  dispatch_logits_dtype(a.logits.dtype, [&](auto dtype) {
    const unsigned rows = static_cast<unsigned>(a.logits.rows);
    const int threads = threads_for_classes(a.logits.classes);
    const size_t smem = branch_stats_bytes(a.mode, a.logits.branches, false);
    if (a.weights != nullptr) {
      ensemble_backward_kernel<decltype(dtype), true><<<rows, threads, smem, stream>>>(a);
    } else {
      ensemble_backward_kernel<decltype(dtype), false><<<rows, threads, smem, stream>>>(a);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ops
}  // namespace divco
