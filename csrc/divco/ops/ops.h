// The device implementations of the divco:: operators (registered in registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "op_common.h"

namespace divco {
namespace ops {

CotrainResult cotrain_loss_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                               const std::optional<at::Tensor>& sample_weight, std::string_view kind, double temperature, bool compute_grad);
at::Tensor ensemble_cpu(const at::Tensor& logits, std::string_view mode, const std::optional<at::Tensor>& weights);
at::Tensor ensemble_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits, std::string_view mode,
                                 const std::optional<at::Tensor>& weights);

#if defined(DIVCO_WITH_CUDA)
CotrainResult cotrain_loss_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                const std::optional<at::Tensor>& sample_weight, std::string_view kind, double temperature, bool compute_grad);
at::Tensor ensemble_cuda(const at::Tensor& logits, std::string_view mode, const std::optional<at::Tensor>& weights);
at::Tensor ensemble_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits, std::string_view mode,
                                  const std::optional<at::Tensor>& weights);
#endif

namespace cpu {
void run_cotrain_loss(const CotrainArgs& args);
void run_ensemble(const EnsembleArgs& args);
void run_ensemble_backward(const EnsembleBackwardArgs& args);
}  // namespace cpu

}  // namespace ops
}  // namespace divco

// -- batch_norm (cpu/batch_norm_kernel.cpp: host checks shared with CUDA, and the CPU kernels) --
#include <optional>

#include "../batch_norm_math.h"

namespace divco {
namespace ops {

// Everything one batch_norm call allocates; `args` points into these tensors.
struct BatchNormForwardCall {
  BatchNormLayout layout;
  BatchNormArgs args;
  at::Tensor x, weight, bias, residual, running_mean, running_var;  // kept alive (contiguous copies)
  at::Tensor out, mean, var;                                        // the op's outputs
};

struct BatchNormBackwardCall {
  BatchNormLayout layout;
  BatchNormArgs args;
  at::Tensor grad_out, out, weight, mean, var;              // kept alive (in x's layout)
  at::Tensor grad_x, grad_residual, grad_weight, grad_bias;  // the op's outputs
};

BatchNormForwardCall prepare_batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& running_mean,
                                        const std::optional<at::Tensor>& running_var,
                                        const std::optional<at::Tensor>& residual, bool training, double eps,
                                        bool relu, c10::DeviceType expected_device);
BatchNormBackwardCall prepare_batch_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                  const std::optional<at::Tensor>& out,
                                                  const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                                  const at::Tensor& var, bool training, double eps, bool relu,
                                                  bool residual_grad, c10::DeviceType expected_device);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool training, double eps, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& out,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    bool relu, bool residual_grad);

#if defined(DIVCO_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool training, double eps, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& out,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    bool relu, bool residual_grad);
#endif

namespace cpu {
void run_batch_norm(const BatchNormArgs& args);
void run_batch_norm_backward(const BatchNormArgs& args);
}  // namespace cpu

}  // namespace ops
}  // namespace divco
