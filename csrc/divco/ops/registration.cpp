// The divco:: operators: schemas and their CPU and CUDA kernels. The schema strings must
// equal divco/ops/schema.py (tests/native/test_build.py checks it); the fake kernels and
// autograd are registered from Python (divco/ops/fused.py).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(divco, m) {
  m.def(
      "cotrain_loss_native(Tensor logits, Tensor target, Tensor weight, Tensor? sample_weight, str kind, "
      "float temperature, bool compute_grad) -> (Tensor loss, Tensor ce, Tensor cot, Tensor ensemble, Tensor correct, Tensor grad)");
  m.def("ensemble_native(Tensor logits, str mode, Tensor? weights) -> Tensor");
  m.def("ensemble_backward_native(Tensor grad_out, Tensor logits, str mode, Tensor? weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(divco, CPU, m) {
  m.impl("cotrain_loss_native", &divco::ops::cotrain_loss_cpu);
  m.impl("ensemble_native", &divco::ops::ensemble_cpu);
  m.impl("ensemble_backward_native", &divco::ops::ensemble_backward_cpu);
}

#if defined(DIVCO_WITH_CUDA)
TORCH_LIBRARY_IMPL(divco, CUDA, m) {
  m.impl("cotrain_loss_native", &divco::ops::cotrain_loss_cuda);
  m.impl("ensemble_native", &divco::ops::ensemble_cuda);
  m.impl("ensemble_backward_native", &divco::ops::ensemble_backward_cuda);
}
#endif

// batch_norm: the schemas of divco/ops/batch_norm.py (BATCH_NORM_SCHEMA, BATCH_NORM_BACKWARD_SCHEMA).
TORCH_LIBRARY_FRAGMENT(divco, m) {
  m.def(
      "batch_norm_native(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor? residual, bool training, float eps, bool relu) -> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "batch_norm_backward_native(Tensor grad_out, Tensor x, Tensor? out, Tensor? weight, Tensor mean, Tensor var, "
      "bool training, float eps, bool relu, bool residual_grad) -> (Tensor grad_x, Tensor grad_residual, "
      "Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(divco, CPU, m) {
  m.impl("batch_norm_native", &divco::ops::batch_norm_cpu);
  m.impl("batch_norm_backward_native", &divco::ops::batch_norm_backward_cpu);
}

#if defined(DIVCO_WITH_CUDA)
TORCH_LIBRARY_IMPL(divco, CUDA, m) {
  m.impl("batch_norm_native", &divco::ops::batch_norm_cuda);
  m.impl("batch_norm_backward_native", &divco::ops::batch_norm_backward_cuda);
}
#endif
