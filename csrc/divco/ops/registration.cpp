// The divco:: operators: schemas and their CPU and CUDA kernels. The schema strings must
// equal divco/ops/schema.py (tests/native/test_build.py checks it); the fake kernels and
// autograd are registered from Python (divco/ops/fused.py).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(divco, m) {
  m.def(
      "cotrain_loss_native(Tensor logits, Tensor target, Tensor weight, str kind, float temperature, "
      "bool compute_grad) -> (Tensor loss, Tensor ce, Tensor cot, Tensor ensemble, Tensor correct, Tensor grad)");
  m.def("ensemble_native(Tensor logits, str mode) -> Tensor");
  m.def("ensemble_backward_native(Tensor grad_out, Tensor logits, str mode) -> Tensor");
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
