// Host side of the CUDA divco::ensemble_native and divco::ensemble_backward_native: checks
// and allocation (../op_common.cpp), then the launchers on the current stream of the logits'
// device; registered for the CUDA dispatch key. Nothing here waits for the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_common.h"
#include "launchers.h"

namespace divco {
namespace ops {
namespace {

at::Tensor ensemble_cuda(const at::Tensor& logits, std::string_view mode, const std::optional<at::Tensor>& weights) {
  EnsembleCall call = prepare_ensemble(logits, mode, weights, c10::DeviceType::CUDA);
  check_cuda_extents(call.args.logits, "ensemble_native");
  check_ensemble_cuda_branches(call.args.logits, call.args.mode, cuda::kMaxEnsembleBranches, "ensemble_native");
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_ensemble(call.args, c10::cuda::getCurrentCUDAStream()));
  return call.out;
}

at::Tensor ensemble_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits, std::string_view mode,
                                  const std::optional<at::Tensor>& weights) {
  EnsembleBackwardCall call = prepare_ensemble_backward(grad_out, logits, mode, weights, c10::DeviceType::CUDA);
  check_cuda_extents(call.args.logits, "ensemble_backward_native");
  check_ensemble_cuda_branches(call.args.logits, call.args.mode, cuda::kMaxEnsembleBranches,
                               "ensemble_backward_native");
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_ensemble_backward(call.args, c10::cuda::getCurrentCUDAStream()));
  return call.grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(divco, CUDA, m) {
  m.impl("ensemble_native", &ensemble_cuda);
  m.impl("ensemble_backward_native", &ensemble_backward_cuda);
}

}  // namespace ops
}  // namespace divco
