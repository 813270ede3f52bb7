// Host-side checks and buffer allocation shared by the CPU and CUDA implementations of
// the fused ops: one set of error messages, one definition of the output shapes.
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
CotrainCall prepare_cotrain(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
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

}  // namespace ops
}  // namespace divco
