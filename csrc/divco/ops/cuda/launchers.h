// Entry points of the CUDA kernels (cuda/*.cu). Plain arguments only, so the .cu files
// include no ATen header; the host wrappers in ops_cuda.cpp own tensors and streams.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "../kernel_args.h"

namespace divco {
namespace ops {
namespace cuda {

// The most branches one CUDA kernel handles (per-thread registers hold one value per branch).
constexpr int kMaxBranches = 16;

// Each launcher enqueues its kernels on `stream` and returns cudaGetLastError().
cudaError_t launch_cotrain_loss(const CotrainArgs& args, cudaStream_t stream);
cudaError_t launch_ensemble(const EnsembleArgs& args, cudaStream_t stream);
cudaError_t launch_ensemble_backward(const EnsembleBackwardArgs& args, cudaStream_t stream);

struct BuildInfo {
  std::vector<int> archs;  // __CUDA_ARCH_LIST__ of the compilation, e.g. {800, 900}
  int cuda_runtime_version;  // CUDART_VERSION the kernels were compiled against
};
BuildInfo build_info();

}  // namespace cuda
}  // namespace ops
}  // namespace divco
