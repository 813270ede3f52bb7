// Host side of the CUDA divco::cotrain_loss_native: checks and allocation (../op_common.cpp),
// then the launcher on the current stream of the logits' device; registered for the CUDA
// dispatch key. Nothing here waits for the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_common.h"
#include "launchers.h"

namespace divco {
namespace ops {
namespace {

CotrainResult cotrain_loss_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                const std::optional<at::Tensor>& sample_weight, std::string_view kind,
                                double temperature, bool compute_grad) {
  CotrainCall call = prepare_cotrain_loss(logits, target, weight, sample_weight, kind, temperature, compute_grad,
                                     c10::DeviceType::CUDA);
  check_cuda_extents(call.args.logits, "cotrain_loss_native");
  check_cotrain_cuda_branches(call.args.logits, cuda::kMaxBranches);
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_cotrain_loss(call.args, c10::cuda::getCurrentCUDAStream()));
  return call.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(divco, CUDA, m) { m.impl("cotrain_loss_native", &cotrain_loss_cuda); }

}  // namespace ops
}  // namespace divco
