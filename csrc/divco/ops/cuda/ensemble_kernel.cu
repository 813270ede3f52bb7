// CUDA kernels of divco::ensemble_native and divco::ensemble_backward_native: one block per
// row, online softmax over K (block reductions), fp32 arithmetic, any number of branches.
// Formulas from ../../cotrain_math.h, shared with the CPU kernels.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../../cotrain_math.h"
#include "../kernel_args.h"
#include "block_reduce.cuh"
#include "launchers.h"

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

template <typename scalar_t>
__device__ __forceinline__ float load(const void* base, int64_t offset) {
  return static_cast<float>(static_cast<const scalar_t*>(base)[offset]);
}

template <typename scalar_t>
__device__ __forceinline__ void store(void* base, int64_t offset, float value) {
  static_cast<scalar_t*>(base)[offset] = static_cast<scalar_t>(value);
}

// Mean over branches of class k of the row starting at `row` (branch order fixed).
template <typename scalar_t>
__device__ __forceinline__ float mean_logit(const LogitsView& v, int64_t row, int k) {
  float sum = 0.0f;
  for (int s = 0; s < static_cast<int>(v.branches); ++s) {
    const float z = load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class);
    sum = s == 0 ? z : sum + z;
  }
  return sum / static_cast<float>(v.branches);
}

// Softmax statistics of one branch (all threads get the block total).
template <typename scalar_t>
__device__ m::SoftmaxStats branch_stats(const LogitsView& v, int64_t branch, m::SoftmaxStats* scratch) {
  m::SoftmaxStats stats = m::softmax_stats_empty();
  for (int k = threadIdx.x; k < static_cast<int>(v.classes); k += blockDim.x) {
    stats = m::softmax_stats_add(stats, load<scalar_t>(v.data, branch + k * v.stride_class), 1.0f);
  }
  return block_allreduce(stats, ShuffleStats{}, MergeStats{}, scratch);
}

// Softmax statistics of the mean logits of the row.
template <typename scalar_t>
__device__ m::SoftmaxStats mean_logit_stats(const LogitsView& v, int64_t row, m::SoftmaxStats* scratch) {
  m::SoftmaxStats stats = m::softmax_stats_empty();
  for (int k = threadIdx.x; k < static_cast<int>(v.classes); k += blockDim.x) {
    stats = m::softmax_stats_add(stats, mean_logit<scalar_t>(v, row, k), 1.0f);
  }
  return block_allreduce(stats, ShuffleStats{}, MergeStats{}, scratch);
}

// Dynamic shared memory: 2 * S floats (per-branch max and 1/sum) for mean_probs.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) ensemble_kernel(const EnsembleArgs a) {
  extern __shared__ float branch_stats_smem[];
  __shared__ m::SoftmaxStats stats_scratch[32];
  const LogitsView& v = a.logits;
  const int64_t n = blockIdx.x;
  const int S = static_cast<int>(v.branches);
  const int K = static_cast<int>(v.classes);
  const int64_t row = n * v.stride_row;
  const int64_t out_row = n * K;
  switch (a.mode) {
    case EnsembleMode::kMeanLogits:
      for (int k = threadIdx.x; k < K; k += blockDim.x) store<scalar_t>(a.out, out_row + k, mean_logit<scalar_t>(v, row, k));
      break;
    case EnsembleMode::kMax:
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float best = load<scalar_t>(v.data, row + k * v.stride_class);
        for (int s = 1; s < S; ++s) best = m::max_nan(best, load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class));
        store<scalar_t>(a.out, out_row + k, best);
      }
      break;
    case EnsembleMode::kMeanProbs: {
      float* s_max = branch_stats_smem;
      float* s_inv_sum = branch_stats_smem + S;
      for (int s = 0; s < S; ++s) {
        const m::SoftmaxStats stats = branch_stats<scalar_t>(v, row + s * v.stride_branch, stats_scratch);
        if (threadIdx.x == 0) {
          s_max[s] = stats.max;
          s_inv_sum[s] = 1.0f / stats.sum;
        }
      }
      __syncthreads();
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < S; ++s) {
          const float z = load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class);
          sum += m::exp_f32(z - s_max[s]) * s_inv_sum[s];
        }
        store<scalar_t>(a.out, out_row + k, sum / static_cast<float>(S));
      }
      break;
    }
    case EnsembleMode::kGeoMean: {
      // softmax(mean_s log_softmax(z_s)) = softmax(mean_s z_s).
      const m::SoftmaxStats stats = mean_logit_stats<scalar_t>(v, row, stats_scratch);
      const float inv_sum = 1.0f / stats.sum;
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        store<scalar_t>(a.out, out_row + k, m::exp_f32(mean_logit<scalar_t>(v, row, k) - stats.max) * inv_sum);
      }
      break;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) ensemble_backward_kernel(const EnsembleBackwardArgs a) {
  __shared__ m::SoftmaxStats stats_scratch[32];
  __shared__ float float_scratch[32];
  const LogitsView& v = a.logits;
  const int64_t n = blockIdx.x;
  const int S = static_cast<int>(v.branches);
  const int K = static_cast<int>(v.classes);
  const int64_t row = n * v.stride_row;
  const int64_t g_row = n * a.grad_out_stride_row;
  const float inv_branches = 1.0f / static_cast<float>(S);
  auto grad_out = [&](int k) { return load<scalar_t>(a.grad_out, g_row + k * a.grad_out_stride_class); };
  auto out_offset = [&](int s, int k) { return (n * S + s) * static_cast<int64_t>(K) + k; };
  switch (a.mode) {
    case EnsembleMode::kMeanLogits:
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float g = grad_out(k) / static_cast<float>(S);
        for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), g);
      }
      break;
    case EnsembleMode::kMax:
      // The first maximal branch (a NaN counts as maximal) gets the gradient, like torch.max.
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        int best = 0;
        float best_value = load<scalar_t>(v.data, row + k * v.stride_class);
        for (int s = 1; s < S; ++s) {
          const float z = load<scalar_t>(v.data, row + s * v.stride_branch + k * v.stride_class);
          if (m::argmax_prefers(z, s, best_value, best)) {
            best = s;
            best_value = z;
          }
        }
        const float g = grad_out(k);
        for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), s == best ? g : 0.0f);
      }
      break;
    case EnsembleMode::kMeanProbs:
      for (int s = 0; s < S; ++s) {
        const int64_t branch = row + s * v.stride_branch;
        const m::SoftmaxStats stats = branch_stats<scalar_t>(v, branch, stats_scratch);
        const float inv_sum = 1.0f / stats.sum;
        float dot = 0.0f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
          dot += grad_out(k) * (m::exp_f32(load<scalar_t>(v.data, branch + k * v.stride_class) - stats.max) * inv_sum);
        }
        dot = block_sum(dot, float_scratch);
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
          const float p = m::exp_f32(load<scalar_t>(v.data, branch + k * v.stride_class) - stats.max) * inv_sum;
          store<scalar_t>(a.grad_logits, out_offset(s, k), m::softmax_backward_element(p, grad_out(k), dot, inv_branches));
        }
      }
      break;
    case EnsembleMode::kGeoMean: {
      const m::SoftmaxStats stats = mean_logit_stats<scalar_t>(v, row, stats_scratch);
      const float inv_sum = 1.0f / stats.sum;
      float dot = 0.0f;
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        dot += grad_out(k) * (m::exp_f32(mean_logit<scalar_t>(v, row, k) - stats.max) * inv_sum);
      }
      dot = block_sum(dot, float_scratch);
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float e = m::exp_f32(mean_logit<scalar_t>(v, row, k) - stats.max) * inv_sum;
        const float g = m::softmax_backward_element(e, grad_out(k), dot, inv_branches);
        for (int s = 0; s < S; ++s) store<scalar_t>(a.grad_logits, out_offset(s, k), g);
      }
      break;
    }
  }
}

template <typename scalar_t>
void launch_forward(const EnsembleArgs& a, cudaStream_t stream) {
  const size_t smem = a.mode == EnsembleMode::kMeanProbs ? 2 * sizeof(float) * static_cast<size_t>(a.logits.branches) : 0;
  ensemble_kernel<scalar_t>
      <<<static_cast<unsigned>(a.logits.rows), threads_for_classes(a.logits.classes), smem, stream>>>(a);
}

template <typename scalar_t>
void launch_backward(const EnsembleBackwardArgs& a, cudaStream_t stream) {
  ensemble_backward_kernel<scalar_t>
      <<<static_cast<unsigned>(a.logits.rows), threads_for_classes(a.logits.classes), 0, stream>>>(a);
}

}  // namespace

cudaError_t launch_ensemble(const EnsembleArgs& a, cudaStream_t stream) {
  if (a.logits.rows == 0) return cudaSuccess;
  switch (a.logits.dtype) {
    case LogitsDtype::kFloat32:
      launch_forward<float>(a, stream);
      break;
    case LogitsDtype::kBFloat16:
      launch_forward<c10::BFloat16>(a, stream);
      break;
    case LogitsDtype::kFloat16:
      launch_forward<c10::Half>(a, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_ensemble_backward(const EnsembleBackwardArgs& a, cudaStream_t stream) {
  if (a.logits.rows == 0) return cudaSuccess;
  switch (a.logits.dtype) {
    case LogitsDtype::kFloat32:
      launch_backward<float>(a, stream);
      break;
    case LogitsDtype::kBFloat16:
      launch_backward<c10::BFloat16>(a, stream);
      break;
    case LogitsDtype::kFloat16:
      launch_backward<c10::Half>(a, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ops
}  // namespace divco
