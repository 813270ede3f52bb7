// Host-side checks and buffer allocation of every divco:: operator (op_common.cpp), shared by
// its CPU and CUDA implementations: one set of error messages, one definition of the output
// shapes. Each prepare_<op> validates the tensors (TORCH_CHECK_VALUE: a ValueError in Python
// that names what was expected and what came), allocates the outputs on the input's device and
// fills the plain-data arguments (kernel_args.h) the kernels read; the CUDA limits of the
// kernels are checked here too, with the limits passed by the CUDA host code.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <string_view>

#include <tuple>

#include "kernel_args.h"

namespace divco {
namespace ops {

using CotrainResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Everything one cotrain_loss call allocates; `args` points into these tensors.
struct CotrainCall {
  CotrainArgs args;
  at::Tensor loss, ce, cot, ensemble, correct, grad;  // the op's outputs
  at::Tensor row_ce, row_cot, row_hits;              // per-row partials
  at::Tensor target;                                  // kept alive (float32 copy of soft targets)
  at::Tensor sample_weight;                           // kept alive (undefined without weights)

  CotrainResult outputs() const { return {loss, ce, cot, ensemble, correct, grad}; }
};

// Validates the inputs (TORCH_CHECK_VALUE: a ValueError in Python that names what was
// expected and what came) and allocates outputs and partials on the logits' device.
CotrainCall prepare_cotrain_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                            const std::optional<at::Tensor>& sample_weight, std::string_view kind, double temperature, bool compute_grad,
                            c10::DeviceType expected_device);

struct EnsembleCall {
  EnsembleArgs args;
  at::Tensor weights;  // kept alive (contiguous), undefined without weights
  at::Tensor out;
};

EnsembleCall prepare_ensemble(const at::Tensor& logits, std::string_view mode,
                              const std::optional<at::Tensor>& weights, c10::DeviceType expected_device);

struct EnsembleBackwardCall {
  EnsembleBackwardArgs args;
  at::Tensor grad_out;  // kept alive (converted to the logits dtype when it differs)
  at::Tensor weights;   // kept alive (contiguous), undefined without weights
  at::Tensor grad_logits;
};

EnsembleBackwardCall prepare_ensemble_backward(const at::Tensor& grad_out, const at::Tensor& logits,
                                               std::string_view mode, const std::optional<at::Tensor>& weights,
                                               c10::DeviceType expected_device);

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

// Checks the running-statistics update (every tensor float32 [C] contiguous on the expected
// device, num_batches_tracked a one-element int64 tensor when momentum is None, count >= 2).
BatchNormUpdateArgs prepare_batch_norm_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                                    const at::Tensor& mean, const at::Tensor& var,
                                                    const std::optional<at::Tensor>& num_batches_tracked,
                                                    std::optional<double> momentum, int64_t count,
                                                    c10::DeviceType expected_device);

// -- the limits of the CUDA kernels (the values come from cuda/launchers.h) --

// Rows and classes are indexed with 32-bit ints on the GPU.
void check_cuda_extents(const LogitsView& v, const char* op);
// The co-training loss kernel keeps one value per branch in registers.
void check_cotrain_cuda_branches(const LogitsView& v, int max_branches);
// mean_probs / max_probs keep two floats per branch in shared memory, vote one int.
void check_ensemble_cuda_branches(const LogitsView& v, EnsembleMode mode, int max_branches, const char* op);

}  // namespace ops
}  // namespace divco
