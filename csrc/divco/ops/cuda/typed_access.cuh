// Typed element access of the CUDA kernels: logits and activations are read as float whatever
// their storage dtype (float / at::BFloat16 / at::Half) and written back rounded to it.
#pragma once

#include <cstdint>

namespace divco {
namespace ops {
namespace cuda {

template <typename scalar_t>
__device__ __forceinline__ float load(const void* base, int64_t offset) {
  return static_cast<float>(static_cast<const scalar_t*>(base)[offset]);
}

template <typename scalar_t>
__device__ __forceinline__ void store(void* base, int64_t offset, float value) {
  static_cast<scalar_t*>(base)[offset] = static_cast<scalar_t>(value);
}

}  // namespace cuda
}  // namespace ops
}  // namespace divco
