// The device implementations of the divco:: operators (registered in registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>

#include "op_common.h"

namespace divco {
namespace ops {

CotrainResult cotrain_loss_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                               std::string_view kind, double temperature, bool compute_grad);
at::Tensor ensemble_cpu(const at::Tensor& logits, std::string_view mode);
at::Tensor ensemble_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits, std::string_view mode);

#if defined(DIVCO_WITH_CUDA)
CotrainResult cotrain_loss_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                std::string_view kind, double temperature, bool compute_grad);
at::Tensor ensemble_cuda(const at::Tensor& logits, std::string_view mode);
at::Tensor ensemble_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits, std::string_view mode);
#endif

namespace cpu {
void run_cotrain_loss(const CotrainArgs& args);
void run_ensemble(const EnsembleArgs& args);
void run_ensemble_backward(const EnsembleBackwardArgs& args);
}  // namespace cpu

}  // namespace ops
}  // namespace divco
