// Host side of the CUDA divco::batch_norm_native and divco::batch_norm_backward_native: checks
// and allocation (../op_common.cpp), workspaces, then the launchers on the current stream of
// x's device; registered for the CUDA dispatch key. Nothing here waits for the GPU
// (CUDA-graph capturable: the workspaces come from the caching allocator).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_common.h"
#include "launchers.h"

namespace divco {
namespace ops {
namespace {

struct Workspace {
  at::Tensor partial, coefficients;
};

Workspace workspace(const at::Tensor& x, const BatchNormLayout& layout) {
  const int64_t chunks = cuda::batch_norm_chunks(layout);
  return {at::empty({chunks * 2 * layout.channels}, x.options().dtype(at::kDouble)),
          at::empty({3 * layout.channels}, x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool training, double eps, bool relu) {
  BatchNormForwardCall call = prepare_batch_norm(x, weight, bias, running_mean, running_var, residual, training, eps,
                                                 relu, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  Workspace ws = workspace(x, call.layout);
  C10_CUDA_CHECK(cuda::launch_batch_norm(call.args, ws.partial.data_ptr<double>(), ws.coefficients.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream()));
  return {call.out, call.mean, call.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& out,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    bool relu, bool residual_grad) {
  BatchNormBackwardCall call = prepare_batch_norm_backward(grad_out, x, out, weight, mean, var, training, eps, relu,
                                                           residual_grad, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  Workspace ws = workspace(x, call.layout);
  C10_CUDA_CHECK(cuda::launch_batch_norm_backward(call.args, ws.partial.data_ptr<double>(),
                                                  ws.coefficients.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {call.grad_x, call.grad_residual, call.grad_weight, call.grad_bias};
}

void batch_norm_update_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const at::Tensor& mean, const at::Tensor& var,
                                  const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
                                  int64_t count) {
  const BatchNormUpdateArgs args = prepare_batch_norm_update_stats(running_mean, running_var, mean, var,
                                                                   num_batches_tracked, momentum, count,
                                                                   c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(running_mean.device());
  C10_CUDA_CHECK(cuda::launch_batch_norm_update_stats(args, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(divco, CUDA, m) {
  m.impl("batch_norm_native", &batch_norm_cuda);
  m.impl("batch_norm_backward_native", &batch_norm_backward_cuda);
  m.impl("batch_norm_update_stats_native", &batch_norm_update_stats_cuda);
}

}  // namespace ops
}  // namespace divco
