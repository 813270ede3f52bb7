// Host side of the CUDA implementations: checks and allocation (op_common), then the
// launchers on the current stream of the logits' device. Nothing here waits for the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <limits>

#include "../ops.h"
#include "launchers.h"

namespace divco {
namespace ops {
namespace {

void check_cuda_limits(const LogitsView& v, const char* op) {
  TORCH_CHECK_VALUE(v.classes <= std::numeric_limits<int32_t>::max(), op,
                    ": the CUDA kernels take at most 2^31 - 1 classes; got K = ", v.classes);
  TORCH_CHECK_VALUE(v.rows <= std::numeric_limits<int32_t>::max(), op,
                    ": the CUDA kernels take at most 2^31 - 1 rows; got N = ", v.rows);
}

// mean_probs / max_probs keep two floats per branch in shared memory, vote one int (launchers.h).
void check_ensemble_branches(const LogitsView& v, EnsembleMode mode, const char* op) {
  const char* name = mode == EnsembleMode::kMeanProbs  ? "mean_probs"
                     : mode == EnsembleMode::kMaxProbs ? "max_probs"
                     : mode == EnsembleMode::kVote     ? "vote"
                                                       : nullptr;
  if (name == nullptr) return;
  TORCH_CHECK_VALUE(v.branches <= cuda::kMaxEnsembleBranches, op, ": the CUDA kernel of the ", name,
                    " ensemble takes at most ", cuda::kMaxEnsembleBranches, " branches (S); got S = ", v.branches);
}

}  // namespace

CotrainResult cotrain_loss_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                const std::optional<at::Tensor>& sample_weight, std::string_view kind,
                                double temperature, bool compute_grad) {
  CotrainCall call = prepare_cotrain(logits, target, weight, sample_weight, kind, temperature, compute_grad, c10::DeviceType::CUDA);
  check_cuda_limits(call.args.logits, "cotrain_loss_native");
  TORCH_CHECK_VALUE(call.args.logits.branches <= cuda::kMaxBranches,
                    "cotrain_loss_native: the CUDA kernel takes at most ", cuda::kMaxBranches,
                    " branches (S); got S = ", call.args.logits.branches,
                    " (the Triton and torch backends take any S)");
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_cotrain_loss(call.args, c10::cuda::getCurrentCUDAStream()));
  return call.outputs();
}

at::Tensor ensemble_cuda(const at::Tensor& logits, std::string_view mode, const std::optional<at::Tensor>& weights) {
  EnsembleCall call = prepare_ensemble(logits, mode, weights, c10::DeviceType::CUDA);
  check_cuda_limits(call.args.logits, "ensemble_native");
  check_ensemble_branches(call.args.logits, call.args.mode, "ensemble_native");
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_ensemble(call.args, c10::cuda::getCurrentCUDAStream()));
  return call.out;
}

at::Tensor ensemble_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits, std::string_view mode,
                                  const std::optional<at::Tensor>& weights) {
  EnsembleBackwardCall call = prepare_ensemble_backward(grad_out, logits, mode, weights, c10::DeviceType::CUDA);
  check_cuda_limits(call.args.logits, "ensemble_backward_native");
  check_ensemble_branches(call.args.logits, call.args.mode, "ensemble_backward_native");
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_ensemble_backward(call.args, c10::cuda::getCurrentCUDAStream()));
  return call.grad_logits;
}

}  // namespace ops
}  // namespace divco
