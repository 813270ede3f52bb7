// Block-wide reductions for the CUDA kernels (one block per row). Deterministic: a fixed
// shuffle tree inside each warp, then warp results combined in warp order by one thread.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../cotrain_math.h"

namespace divco {
namespace ops {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float shfl_down(float v, int offset) { return __shfl_down_sync(kFullMask, v, offset); }
__device__ __forceinline__ int shfl_down(int v, int offset) { return __shfl_down_sync(kFullMask, v, offset); }
__device__ __forceinline__ double shfl_down(double v, int offset) { return __shfl_down_sync(kFullMask, v, offset); }
__device__ __forceinline__ long long shfl_down(long long v, int offset) {
  return __shfl_down_sync(kFullMask, v, offset);
}

// Combines `value` over the whole block and returns the result to every thread.
// Requirements: blockDim.x is a multiple of 32 and at most 1024, every thread of the block
// calls it (no early return), `scratch` holds 32 values in shared memory. `Shuffle(v, offset)`
// shuffles a T down the warp; `combine(a, b)` merges two partial results.
template <typename T, typename Shuffle, typename Combine>
__device__ T block_allreduce(T value, Shuffle shuffle, Combine combine, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = combine(value, shuffle(value, offset));
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = scratch[0];
    for (int w = 1; w < warps; ++w) total = combine(total, scratch[w]);
    scratch[0] = total;
  }
  __syncthreads();
  const T result = scratch[0];
  __syncthreads();  // scratch may be reused right after
  return result;
}

struct AddFloat {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct ShuffleFloat {
  __device__ float operator()(float v, int offset) const { return shfl_down(v, offset); }
};

__device__ __forceinline__ float block_sum(float value, float* scratch) {
  return block_allreduce(value, ShuffleFloat{}, AddFloat{}, scratch);
}

// A top-1 candidate, a value and its index, and the block-wide arg-max of them (torch.argmax:
// NaN first, then the first maximum, math::argmax_prefers): the one arg-max reduction of every
// kernel (the ensemble's branch top-1, the co-training loss's ensemble top-1).
struct ArgMax {
  float value;
  int index;
};
struct ShuffleArgMax {
  __device__ ArgMax operator()(ArgMax v, int offset) const {
    return {shfl_down(v.value, offset), shfl_down(v.index, offset)};
  }
};
struct CombineArgMax {
  __device__ ArgMax operator()(ArgMax a, const ArgMax& b) const {
    return divco::math::argmax_prefers(b.value, b.index, a.value, a.index) ? b : a;
  }
};

// The largest block the row kernels are launched with (their __launch_bounds__).
constexpr int kMaxThreadsPerBlock = 512;

// Threads per block for rows of `classes` values: a warp for small K, up to
// `max_threads` (the kernel's __launch_bounds__) for large K.
inline int threads_for_classes(int64_t classes, int max_threads = kMaxThreadsPerBlock) {
  int threads = 512;
  if (classes <= 128) {
    threads = 32;
  } else if (classes <= 1024) {
    threads = 128;
  } else if (classes <= 4096) {
    threads = 256;
  }
  return threads < max_threads ? threads : max_threads;
}

}  // namespace cuda
}  // namespace ops
}  // namespace divco
