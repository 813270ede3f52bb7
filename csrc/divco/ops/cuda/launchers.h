// Entry points of the CUDA kernels (cuda/<op>_kernel.cu). Plain arguments only, so the .cu
// files include no ATen header; the host code in cuda/<op>_cuda.cpp owns tensors and streams.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "../kernel_args.h"

namespace divco {
namespace ops {
namespace cuda {

// The most branches the co-training loss kernel handles (per-thread registers hold one
// value per branch).
constexpr int kMaxBranches = 16;

// Shared memory a block may use without opting in (every architecture since sm_50).
constexpr int kDefaultSharedMemoryBytes = 48 * 1024;
// Static shared memory set aside for the ensemble kernels' own scratch (block reductions;
// ptxas reports at most 384 bytes, tests/native/test_cuda_compile.py checks the bound).
constexpr int kEnsembleStaticSharedBytes = 1024;
// The mean_probs / max_probs ensembles keep two floats per branch (max, 1 / sum) in
// dynamic shared memory next to that scratch: at most 6016 branches (vote, one int per
// branch, takes the same limit).
constexpr int kMaxEnsembleBranches =
    (kDefaultSharedMemoryBytes - kEnsembleStaticSharedBytes) / static_cast<int>(2 * sizeof(float));

// Each launcher enqueues its kernels on `stream` and returns cudaGetLastError().
cudaError_t launch_cotrain_loss(const CotrainArgs& args, cudaStream_t stream);
cudaError_t launch_ensemble(const EnsembleArgs& args, cudaStream_t stream);
cudaError_t launch_ensemble_backward(const EnsembleBackwardArgs& args, cudaStream_t stream);

// Chunks of positions (n, hw) the reductions split each channel into; the caller allocates
// `partial` as double [chunks, 2, C] and `coefficients` as float [3, C].
int64_t batch_norm_chunks(const BatchNormLayout& layout);
// Each enqueues its kernels on `stream` and returns cudaGetLastError().
cudaError_t launch_batch_norm(const BatchNormArgs& args, double* partial, float* coefficients, cudaStream_t stream);
cudaError_t launch_batch_norm_backward(const BatchNormArgs& args, double* partial, float* coefficients,
                                       cudaStream_t stream);
// The running-statistics update, one thread per channel.
cudaError_t launch_batch_norm_update_stats(const BatchNormUpdateArgs& args, cudaStream_t stream);

struct BuildInfo {
  std::vector<int> archs;  // __CUDA_ARCH_LIST__ of the compilation, e.g. {800, 900}
  int cuda_runtime_version;  // CUDART_VERSION the kernels were compiled against
};
BuildInfo build_info();

}  // namespace cuda
}  // namespace ops
}  // namespace divco
